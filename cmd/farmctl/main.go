// Command farmctl administers a tvixfarm cluster: its status, workers,
// operations and scheduler members, and it measures REAPI endpoints
// (tvixfarm's or a peer's, so the two can be compared side by side).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
)

const usage = `usage: farmctl <command> [flags]

commands:
  status      show a farm's version, roles and storage, and its scheduler
              cluster: members, leader, term, queue, workers
  workers     list the workers
  ops         list operations (--state queued|executing|completed)
  cancel OP   cancel an operation; its sandbox is killed
  drain W     stop assigning actions to worker W (it finishes what it runs)
  undrain W   resume assigning actions to worker W
  members     list, add NODE RAFT_ADDR, or remove NODE scheduler members
  bench cas   measure a REAPI CAS (any implementation): FindMissingBlobs,
              BatchUpdateBlobs, BatchReadBlobs, ByteStream write and read
  bench exec  measure a REAPI Execution service (any implementation):
              actions/s and dispatch and end-to-end latency

Every command takes --farm ADDR (any node of the farm) and most take --json.
Run 'farmctl <command> -h' for its flags.
`

func main() {
	var err error
	switch {
	case len(os.Args) >= 2 && os.Args[1] == "status":
		err = statusCmd(os.Args[2:])
	case len(os.Args) >= 2 && os.Args[1] == "workers":
		err = workersCmd(os.Args[2:])
	case len(os.Args) >= 2 && os.Args[1] == "ops":
		err = opsCmd(os.Args[2:])
	case len(os.Args) >= 2 && os.Args[1] == "cancel":
		err = cancelCmd(os.Args[2:])
	case len(os.Args) >= 2 && os.Args[1] == "drain":
		err = drainCmd(os.Args[2:], true)
	case len(os.Args) >= 2 && os.Args[1] == "undrain":
		err = drainCmd(os.Args[2:], false)
	case len(os.Args) >= 2 && os.Args[1] == "members":
		err = membersCmd(os.Args[2:])
	case len(os.Args) >= 3 && os.Args[1] == "bench" && os.Args[2] == "cas":
		err = benchCAS(os.Args[3:])
	case len(os.Args) >= 3 && os.Args[1] == "bench" && os.Args[2] == "exec":
		err = benchExec(os.Args[3:])
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
