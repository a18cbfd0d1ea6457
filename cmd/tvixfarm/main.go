// Command tvixfarm runs the farm: `tvixfarm serve` starts the storage
// services (REAPI CAS, ByteStream, ActionCache, Capabilities), the
// scheduler and the executor on one gRPC port, and the Nix binary cache
// over HTTP next to it.
//
// Profiling, all off unless the variable is set: TVIXFARM_CPUPROFILE=FILE
// writes a CPU profile of the whole command (go tool pprof format) to FILE;
// TVIXFARM_ALLOCPROFILE=FILE writes the allocations it made (the allocs
// profile) at its end; TVIXFARM_RUSAGE=1 prints, at its end, the CPU time
// of the process itself and of its children (sandbox processes, Nix
// commands) to stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"

	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

const usage = `usage: tvixfarm <command> [flags]

commands:
  serve    start the farm (all roles in one process by default)
  build    build Nix derivations on the farm (like nix-build)
  log      print the build log of a derivation or output path
  version  print the version

Run 'tvixfarm serve -h' for the flags of serve.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	stopProfile := startProfiles(os.Getenv("TVIXFARM_CPUPROFILE"), os.Getenv("TVIXFARM_ALLOCPROFILE"), os.Getenv("TVIXFARM_RUSAGE") != "")
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "build":
		err = build(os.Args[2:])
	case "log":
		err = logCmd(os.Args[2:])
	case "version":
		fmt.Println("tvixfarm", farm.Version)
	case "-h", "-help", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "tvixfarm: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	stopProfile()
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(os.Stderr, "tvixfarm: %v\n", err)
		}
		os.Exit(1)
	}
}

// startProfiles starts a CPU profile into cpuPath and returns the function
// that stops it, writes the allocs profile into allocPath and, if rusage,
// prints the CPU times. Empty paths profile nothing; a profile that cannot
// be written is reported and skipped.
func startProfiles(cpuPath, allocPath string, rusage bool) (stop func()) {
	stopCPU := func() {}
	if cpuPath != "" {
		stopCPU = startCPUProfile(cpuPath)
	}
	return func() {
		stopCPU()
		if allocPath != "" {
			writeProfile("allocs", allocPath)
		}
		if rusage {
			printRusage()
		}
	}
}

func printRusage() {
	var self, children syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &self) != nil || syscall.Getrusage(syscall.RUSAGE_CHILDREN, &children) != nil {
		return
	}
	sec := func(t syscall.Timeval) float64 { return float64(t.Nano()) / 1e9 }
	fmt.Fprintf(os.Stderr, "tvixfarm cpu: self %.3fs user %.3fs sys, children %.3fs user %.3fs sys\n",
		sec(self.Utime), sec(self.Stime), sec(children.Utime), sec(children.Stime))
}

func startCPUProfile(path string) (stop func()) {
	f, err := os.Create(path)
	if err != nil {
		slog.Warn("cpu profile not written", "err", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		slog.Warn("cpu profile not written", "path", path, "err", err)
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			slog.Warn("cpu profile not written", "path", path, "err", err)
		}
	}
}

func writeProfile(name, path string) {
	f, err := os.Create(path)
	if err == nil {
		err = pprof.Lookup(name).WriteTo(f, 0)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		slog.Warn(name+" profile not written", "path", path, "err", err)
	}
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "", "gRPC listen address (default 127.0.0.1:8980)")
	httpListen := fs.String("http-listen", "", "the Nix binary cache's HTTP address (overrides binary_cache.listen; default: the gRPC port plus one, 127.0.0.1:8981; \"\" disables it)")
	data := fs.String("data", "", "data directory (default /var/lib/tvixfarm as root, else $XDG_DATA_HOME/tvixfarm)")
	cfgPath := fs.String("config", "", "configuration file (YAML); every setting has a default")
	role := fs.String("role", "all", "roles to run: all (storage, scheduler and executor in one process), or a comma-separated list of storage, scheduler, executor")
	sched := fs.String("scheduler", "", "address of a scheduler node, or a comma-separated list of nodes, for --role executor (overrides executor.scheduler)")
	logLevel := fs.String("log-level", "", "debug, info, warn or error (overrides the config)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
	}
	for _, r := range strings.Split(*role, ",") {
		switch strings.TrimSpace(r) {
		case "all", "storage", "scheduler", "executor":
		default:
			return fmt.Errorf("serve: unknown role %q (known: all, storage, scheduler, executor, or a comma-separated list)", r)
		}
	}
	cfg := config.Default()
	if *cfgPath != "" {
		var err error
		if cfg, err = config.Load(*cfgPath); err != nil {
			return err
		}
	}
	if *listen != "" {
		cfg.Listen = *listen
	}
	fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "http-listen" {
			cfg.BinaryCache.Listen = httpListen
		}
	})
	if *data != "" {
		cfg.Data = *data
	}
	if *logLevel != "" {
		cfg.LogLevel = *logLevel
	}
	cfg.Role = *role
	if *sched != "" {
		cfg.Executor.Scheduler = *sched
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := newLogger(cfg.LogLevel)
	slog.SetDefault(log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	f, err := farm.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	return f.Serve(ctx)
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	l.UnmarshalText([]byte(level))
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}
