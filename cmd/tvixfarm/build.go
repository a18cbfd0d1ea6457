package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"golang.org/x/term"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/eval"
	"tvixfarm/frontend/nixstore"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

const buildUsage = `usage: tvixfarm build [flags] PATH...

Builds Nix derivations on the farm and prints their output paths, one per
line, like nix-build. PATH is a .nix file or a directory (evaluated with
nix-instantiate) or a .drv store path.

flags:
  --farm ADDR          use the farm at ADDR (default: an embedded all-in-one
                       farm in this process, data in --data)
  -A, --attr ATTR      attribute to build (repeatable)
  --arg NAME EXPR      pass a Nix expression as argument NAME
  --argstr NAME VALUE  pass a string as argument NAME
  -o, --out-link LINK  name of the result symlink (default ./result)
  --no-link            make no result symlink
  -j, --max-jobs N     actions in flight at once (default: no bound)
  -k, --keep-going     build what can be built after a failure
  --data DIR           data directory of the embedded farm
  --config FILE        configuration of the embedded farm
  --digest-function F  blake3 (default) or sha256
  -v, --verbose        log more (repeat for debug)
`

// buildFlags are the flags of build and log.
type buildFlags struct {
	farmAddr, data, cfgPath string
	attrs                   []string
	args, argstrs           map[string]string
	outLink                 string
	noLink, keepGoing       bool
	jobs                    int
	verbose                 int
	digestFunction          string
	paths                   []string
}

// parseBuildFlags parses nix-build style arguments (flags with two
// values, such as --arg NAME EXPR, are not expressible with package flag).
func parseBuildFlags(args []string) (*buildFlags, error) {
	f := &buildFlags{args: map[string]string{}, argstrs: map[string]string{}, outLink: "result", digestFunction: "blake3"}
	need := func(i, n int, name string) error {
		if i+n >= len(args) {
			return fmt.Errorf("%s needs %d argument(s)", name, n)
		}
		return nil
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, val, hasVal := strings.Cut(a, "=")
		if !strings.HasPrefix(a, "-") || a == "-" {
			f.paths = append(f.paths, a)
			continue
		}
		if a == "--" {
			f.paths = append(f.paths, args[i+1:]...)
			break
		}
		one := func() (string, error) {
			if hasVal {
				return val, nil
			}
			if err := need(i, 1, name); err != nil {
				return "", err
			}
			i++
			return args[i], nil
		}
		var err error
		switch name {
		case "--farm":
			f.farmAddr, err = one()
		case "--data":
			f.data, err = one()
		case "--config":
			f.cfgPath, err = one()
		case "-A", "--attr":
			var v string
			v, err = one()
			f.attrs = append(f.attrs, v)
		case "--arg", "--argstr":
			if err := need(i, 2, name); err != nil {
				return nil, err
			}
			if name == "--arg" {
				f.args[args[i+1]] = args[i+2]
			} else {
				f.argstrs[args[i+1]] = args[i+2]
			}
			i += 2
		case "-o", "--out-link":
			f.outLink, err = one()
		case "--no-link", "--no-out-link":
			f.noLink = true
		case "-k", "--keep-going":
			f.keepGoing = true
		case "-j", "--max-jobs":
			var v string
			if v, err = one(); err == nil {
				if f.jobs, err = strconv.Atoi(v); err != nil || f.jobs < 0 {
					err = fmt.Errorf("--max-jobs: %q is not a number", v)
				}
			}
		case "--digest-function":
			f.digestFunction, err = one()
		case "-v", "--verbose":
			f.verbose++
		case "-vv":
			f.verbose += 2
		case "-h", "--help":
			return nil, errHelp
		default:
			return nil, fmt.Errorf("unknown flag %s", a)
		}
		if err != nil {
			return nil, err
		}
	}
	return f, nil
}

var errHelp = errors.New("help")

// farmConn is a connection to a farm, embedded or remote.
type farmConn struct {
	farm  coordinator.Farm
	conn  *grpc.ClientConn
	close func()
}

// connect dials the farm at f.farmAddr, or starts an embedded one.
func connect(ctx context.Context, f *buildFlags, log *slog.Logger) (*farmConn, error) {
	fc := &farmConn{close: func() {}}
	addr := f.farmAddr
	var embedded *farm.Embedded
	if addr == "" {
		cfg := config.Default()
		if f.cfgPath != "" {
			var err error
			if cfg, err = config.Load(f.cfgPath); err != nil {
				return nil, err
			}
		}
		if f.data != "" {
			cfg.Data = f.data
		}
		// The embedded farm's own logs (raft elections, the executor
		// starting) are noise for a user of build unless asked for.
		flog := log
		if f.verbose == 0 {
			flog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
		}
		e, err := farm.StartEmbedded(cfg, flog)
		if err != nil {
			return nil, err
		}
		fc.close = func() {
			if err := e.Close(); err != nil {
				log.Warn("embedded farm", "err", err)
			}
		}
		addr = e.Addr
		embedded = e
	}
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		fc.close()
		return nil, fmt.Errorf("farm %s: %w", addr, err)
	}
	fc.conn = conn
	prev := fc.close
	fc.close = func() { conn.Close(); prev() }
	fc.farm = coordinator.Farm{
		CAS:       blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{}),
		Execution: repb.NewExecutionClient(conn),
		Store:     pathinfo.NewClient(conn),
	}
	if embedded != nil {
		// The embedded farm's CAS and path-info store are used in-process,
		// as its executor uses the CAS: no loopback round trip (and its
		// encoding) for the uploads, output reads and records of every
		// action. Execution stays a gRPC stream.
		fc.farm.CAS, fc.farm.Store = embedded.LocalStores()
	}
	return fc, nil
}

func build(args []string) error {
	f, err := parseBuildFlags(args)
	if errors.Is(err, errHelp) {
		fmt.Print(buildUsage)
		return nil
	}
	if err != nil {
		return fmt.Errorf("build: %v\n\n%s", err, buildUsage)
	}
	if len(f.paths) == 0 {
		f.paths = []string{"./default.nix"}
	}
	level := slog.LevelWarn
	if f.verbose == 1 {
		level = slog.LevelInfo
	} else if f.verbose > 1 {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(log)
	fn, ok := digest.FunctionFromName(f.digestFunction)
	if !ok {
		return fmt.Errorf("build: unknown digest function %q (blake3 or sha256)", f.digestFunction)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	t0 := time.Now()
	phase := func(name string) {
		log.Info("phase done", "phase", name, "took", time.Since(t0).Round(time.Millisecond))
		t0 = time.Now()
	}
	// Without a local Nix, only .drv paths can be built (nothing can
	// evaluate), the farm must already have the sources, and -o writes the
	// outputs as plain files.
	local, localErr := nixstore.Local()
	// The farm starts (or is dialled) and the Nix settings are read while
	// the evaluator runs: they do not depend on each other.
	type prep struct {
		fc       *farmConn
		settings nixstore.Settings
		err      error
	}
	prepc := make(chan prep, 1)
	go func() {
		var p prep
		if local != nil {
			if p.settings, p.err = nixstore.ReadSettings(ctx); p.err != nil {
				p.err = fmt.Errorf("build: reading the Nix settings: %w", p.err)
				prepc <- p
				return
			}
		}
		p.fc, p.err = connect(ctx, f, log)
		prepc <- p
	}()
	taken := false
	defer func() {
		if !taken { // an error before the farm was taken
			if p := <-prepc; p.fc != nil {
				p.fc.close()
			}
		}
	}()
	var targets []coordinator.Request
	var ev eval.Evaluator = eval.NixInstantiate{}
	for _, p := range f.paths {
		if strings.HasSuffix(p, ".drv") {
			abs, err := filepath.Abs(p)
			if err != nil {
				return err
			}
			if real, err := filepath.EvalSymlinks(abs); err == nil {
				abs = real
			}
			targets = append(targets, coordinator.Request{Drv: abs})
			continue
		}
		if local == nil {
			return fmt.Errorf("build: %s: %v (evaluating needs nix-instantiate; .drv paths can be built without)", p, localErr)
		}
		ts, err := ev.Evaluate(ctx, eval.Expr{Path: p, Attrs: f.attrs, Args: f.args, ArgStrs: f.argstrs})
		if err != nil {
			return err
		}
		for _, t := range ts {
			targets = append(targets, coordinator.Request{Drv: t.Drv, Outputs: t.Outputs})
		}
	}
	phase("evaluate")
	p := <-prepc
	taken = true
	if p.err != nil {
		return p.err
	}
	fc, settings := p.fc, p.settings
	defer fc.close()
	phase("settings and connect")
	sandbox, err := coordinator.SandboxFiles(ctx, fc.farm.CAS, fn, settings.SandboxPaths)
	if err != nil {
		return err
	}
	prog := newProgress(os.Stderr)
	c := coordinator.New(fc.farm, coordinator.Config{
		Jobs:      f.jobs,
		KeepGoing: f.keepGoing,
		Local:     local, // may be nil
		Events:    prog.event,
		Logger:    log,
	}.WithTranslate(fn, settings.Cores, sandbox))
	phase("sandbox paths")
	res, err := c.Build(ctx, targets)
	phase("build")
	if res != nil {
		prog.finish(res.Counts)
	}
	if err != nil {
		if res != nil && len(res.Errors) > 1 {
			for _, e := range res.Errors {
				fmt.Fprintf(os.Stderr, "error: %v\n", e)
			}
			return fmt.Errorf("build: %d derivations failed", len(res.Errors))
		}
		return fmt.Errorf("build: %w", err)
	}
	// Register the outputs locally and print them, as nix-build does.
	var outs []string
	for _, t := range targets {
		for _, name := range sortedOutputs(res.Outputs[t.Drv]) {
			outs = append(outs, res.Outputs[t.Drv][name])
		}
	}
	if local != nil {
		if _, err := coordinator.Import(ctx, fc.farm, local, outs); err != nil {
			return fmt.Errorf("build: registering the outputs in the local Nix store: %w", err)
		}
	}
	phase("import")
	defer phase("roots")
	i := 0
	for _, t := range targets {
		outputs := res.Outputs[t.Drv]
		for _, name := range sortedOutputs(outputs) {
			p := outputs[name]
			if !f.noLink {
				link := f.outLink
				if i > 0 {
					link += "-" + strconv.Itoa(i+1)
				}
				if name != "out" {
					link += "-" + name
				}
				if local == nil {
					if err := coordinator.Extract(ctx, fc.farm, p, link); err != nil {
						return fmt.Errorf("build: writing %s: %w", link, err)
					}
				} else if err := local.AddRoot(ctx, p, link); err != nil {
					return fmt.Errorf("build: %w", err)
				}
			}
			fmt.Println(p)
		}
		i++
	}
	return nil
}

// sortedOutputs returns the output names, "out" first, then sorted.
func sortedOutputs(m map[string]string) []string {
	var names []string
	if _, ok := m["out"]; ok {
		names = append(names, "out")
	}
	var rest []string
	for n := range m {
		if n != "out" {
			rest = append(rest, n)
		}
	}
	slices.Sort(rest)
	return append(names, rest...)
}

// progress renders build events: a status line redrawn in place on a
// terminal, plain lines otherwise.
type progress struct {
	mu      sync.Mutex
	w       io.Writer
	tty     bool
	running map[string]string // drv -> name
	last    coordinator.Counts
	drawn   bool
	start   time.Time
}

func newProgress(w *os.File) *progress {
	return &progress{w: w, tty: term.IsTerminal(int(w.Fd())), running: map[string]string{}, start: time.Now()}
}

func (p *progress) event(e coordinator.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.last = e.Counts
	line := ""
	switch e.Kind {
	case coordinator.Uploaded:
		line = fmt.Sprintf("uploaded %d local store paths", e.Paths)
	case coordinator.Started:
		p.running[e.Drv] = e.Name
		if !p.tty {
			line = fmt.Sprintf("building '%s'", e.Drv)
		}
	case coordinator.Built:
		delete(p.running, e.Drv)
		if !p.tty {
			how := "built"
			if e.Cached {
				how = "cached"
			}
			line = fmt.Sprintf("%s '%s' on %s in %s", how, e.Drv, orUnknown(e.Worker), e.Took.Round(time.Millisecond))
		}
	case coordinator.Failed:
		delete(p.running, e.Drv)
		line = fmt.Sprintf("error: %v", e.Err)
	}
	if p.tty {
		p.clear()
		if line != "" {
			fmt.Fprintln(p.w, line)
		}
		p.draw()
	} else if line != "" {
		fmt.Fprintln(p.w, line)
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "an unknown worker"
	}
	return s
}

func (p *progress) clear() {
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}

func (p *progress) draw() {
	c := p.last
	queued := c.Total - c.Built - c.Failed - c.Skipped - c.Running
	s := fmt.Sprintf("[%d/%d built (%d cached), %d running, %d queued, %d failed, %d on the farm, %s]",
		c.Built, c.Total, c.Cached, c.Running, queued, c.Failed, c.Present, time.Since(p.start).Round(time.Second))
	for _, name := range p.running {
		s += " building " + name
		if len(p.running) > 1 {
			s += fmt.Sprintf(" and %d more", len(p.running)-1)
		}
		break
	}
	if w, _, err := term.GetSize(2); err == nil && len(s) > w && w > 3 {
		s = s[:w-3] + "..."
	}
	fmt.Fprint(p.w, s)
	p.drawn = true
}

func (p *progress) finish(c coordinator.Counts) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty {
		p.clear()
	}
	if c.Total > 0 || c.Present > 0 {
		fmt.Fprintf(p.w, "%d built (%d cached), %d failed, %d skipped, %d already on the farm, in %s\n",
			c.Built, c.Cached, c.Failed, c.Skipped, c.Present, time.Since(p.start).Round(time.Millisecond))
	}
}
