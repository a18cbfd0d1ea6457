// Command farmctl administers a tvixfarm cluster. Today it measures a
// REAPI storage endpoint (`farmctl bench cas --farm ADDR`), tvixfarm's or a
// peer's, so the two can be compared side by side.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

const usage = `usage: farmctl <command> [flags]

commands:
  status      show a farm's version, roles and storage
  bench cas   measure a REAPI CAS (any implementation): FindMissingBlobs,
              BatchUpdateBlobs, BatchReadBlobs, ByteStream write and read

Run 'farmctl <command> -h' for its flags.
`

func main() {
	var err error
	switch {
	case len(os.Args) >= 2 && os.Args[1] == "status":
		err = statusCmd(os.Args[2:])
	case len(os.Args) >= 3 && os.Args[1] == "bench" && os.Args[2] == "cas":
		err = benchCAS(os.Args[3:])
	case len(os.Args) >= 2 && (os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help"):
		fmt.Print(usage)
		return
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(os.Stderr, "farmctl: %v\n", err)
		}
		os.Exit(1)
	}
}
