// Package executor runs REAPI actions: given an Action digest it fetches
// the Command and the input root from the CAS, runs the command in a
// sandbox (package sandbox: runc's libcontainer, giving a Nix builder the
// environment of Nix's own sandbox), uploads the outputs and returns a
// complete ActionResult.
//
// Two kinds of action are told apart by their platform:
//
//   - Nix actions have a nix-system property. Their input root becomes the
//     sandbox's root file system: /nix/store/... and /build resolve in it
//     and nothing of the host is visible. argv[0] is the basename of the
//     program, as Nix passes it.
//   - Other actions (Bazel, rexec) run in their input root mounted at
//     /work on top of a read-only root made of host directories, so that
//     /bin/bash and /usr/bin/... exist.
//
// In both, only the working directory, the parents of the outputs and
// /tmp are writable. The files of the input root are hardlinks into a
// local cache (package inputs), read-only and owned by root, except, in
// Nix actions, the files that Nix's sandbox creates itself rather than
// bind-mounts from the store: /etc/passwd, group and hosts (0644, root's)
// and the files of /build (0644, the build user's), as in Nix.
//
// A Nix action's builder sees what a builder of Nix's sandbox sees: it is
// uid 1000 (nixbld) and gid 100 (nixbld) in a user namespace that maps
// only them, to a host build user of the sandbox and the build group
// (sandbox.Instance.BuildUser), with setgroups denied. So root's files
// show as nobody:nogroup, the root directory (0750) and /nix/store
// (1775), which belong to root and the build group, as nobody:nixbld,
// and /build (0700) as nixbld:nixbld.
package executor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/executor/inputs"
	"tvixfarm/executor/outputs"
	"tvixfarm/executor/sandbox"
)

// Platform property names the executor advertises or honours.
const (
	PropOSFamily    = "OSFamily"
	PropISA         = "ISA"
	PropNixSystem   = "nix-system"
	PropNixFeatures = "nix-features"
	// PropNetwork "true" gives the action the host's network (fixed-output
	// derivations); "false" asks explicitly for none (the default).
	PropNetwork = "network"
	// PropPTY "true" merges stdout and stderr into one pty, as Nix's
	// builders see them; the stream is returned as stdout.
	PropPTY = "nix-pty"
	// PropMemoryLimit is a memory limit in bytes (suffixes K, M, G, T).
	PropMemoryLimit = "memory-limit"
	// PropPidsLimit bounds the number of processes and threads.
	PropPidsLimit = "pids-limit"
	// PropCPULimit bounds CPU time, in cores ("1.5").
	PropCPULimit = "cpu-limit"
	// PropMinMemory is the memory the build needs (Tvix's min_memory;
	// suffixes K, M, G, T): a worker with less, or a memory limit below
	// it, refuses the action with FAILED_PRECONDITION.
	PropMinMemory = "min-memory"
)

// OptionProperties are the platform properties that configure how an
// action runs rather than which worker may run it; the scheduler does not
// match them against workers' platforms.
var OptionProperties = []string{PropNetwork, PropPTY, PropMemoryLimit, PropPidsLimit, PropCPULimit, PropMinMemory}

// Config configures an Executor.
type Config struct {
	// Name identifies this worker in ActionResults (default: hostname).
	Name string
	// Systems are the Nix systems it builds for (default x86_64-linux).
	Systems []string
	// Features are the Nix system features it offers (e.g. kvm,
	// big-parallel).
	Features []string
	// Slots is the number of actions that run at once (default: CPUs).
	Slots int
	// DefaultTimeout applies to actions that set none (default 3h);
	// MaxTimeout caps what actions may ask for (default 24h).
	DefaultTimeout, MaxTimeout time.Duration
	// Dir is a directory of the executor's own, on the file system of the
	// sandboxes' input roots: the /etc files Nix's sandbox has are kept
	// there and hardlinked into input roots that lack them (creating
	// files costs milliseconds on busy disks here; a link does not).
	Dir string
	// InlineLimit bounds stdout and stderr inlined into results on request
	// (default 64 KiB).
	InlineLimit int64
	// Layers, if set, gives Nix actions their store paths (the entries
	// of nix/store in the input root) as one overlay of layers shared
	// across actions, rather than hardlinking every file of the closure
	// for every action.
	Layers *inputs.Layers
	// PlainREAPI makes the executor behave like a stock REAPI worker
	// that chroots into the input root (Buildbarn's bb_runner with
	// chroot_into_input_root: true), to test what such a cluster gives
	// a gateway's actions: every action runs chrooted into its input
	// root as it is (no /etc files added, no Nix modes or owners, argv[0]
	// as given), stdout and stderr are separate, and tvixfarm's option
	// properties (network, nix-pty, limits) are ignored: the network is
	// always the default (none but lo). Selection properties (nix-system,
	// nix-features) are still matched, as a stock scheduler matches a
	// worker's platform.
	PlainREAPI bool
	// Logger receives the executor's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Executor runs actions. It is safe for concurrent use; at most
// Config.Slots actions run at once, the others wait in Execute.
type Executor struct {
	cfg   Config
	cas   blobstore.BlobAccess
	mat   *inputs.Materializer
	sb    sandbox.Sandbox
	slots chan struct{}
	log   *slog.Logger
}

// New returns an executor that reads actions from and writes outputs to
// cas, materialises input roots with mat and runs commands in sb.
func New(cfg Config, cas blobstore.BlobAccess, mat *inputs.Materializer, sb sandbox.Sandbox) *Executor {
	if cfg.Name == "" {
		cfg.Name, _ = os.Hostname()
	}
	if len(cfg.Systems) == 0 {
		cfg.Systems = []string{"x86_64-linux"}
	}
	if cfg.Slots <= 0 {
		cfg.Slots = runtime.NumCPU()
	}
	if cfg.DefaultTimeout <= 0 {
		cfg.DefaultTimeout = 3 * time.Hour
	}
	if cfg.MaxTimeout <= 0 {
		cfg.MaxTimeout = 24 * time.Hour
	}
	if cfg.InlineLimit <= 0 {
		cfg.InlineLimit = 64 << 10
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Executor{cfg: cfg, cas: cas, mat: mat, sb: sb, slots: make(chan struct{}, cfg.Slots), log: log}
}

// Init prepares the executor's directory; New's caller runs it once.
func (e *Executor) Init() error {
	if e.cfg.Dir == "" {
		return nil
	}
	etc := filepath.Join(e.cfg.Dir, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("executor: %w", err)
	}
	for name, content := range nixEtc {
		p := filepath.Join(etc, name)
		tmp := p + ".tmp"
		os.Remove(tmp)
		if err := os.WriteFile(tmp, []byte(content), nixEtcMode); err != nil {
			return fmt.Errorf("executor: %w", err)
		}
		if err := os.Chmod(tmp, nixEtcMode); err != nil { // not subject to the umask
			return fmt.Errorf("executor: %w", err)
		}
		if err := os.Rename(tmp, p); err != nil {
			return fmt.Errorf("executor: %w", err)
		}
	}
	return nil
}

// nixEtc are the /etc files of Nix's sandbox, which Nix writes with mode
// nixEtcMode; the executor's copies (in Config.Dir/etc) are root's and
// shared by all actions: the build user cannot change them.
var nixEtc = map[string]string{"passwd": sandbox.NixPasswd, "group": sandbox.NixGroup, "hosts": sandbox.NixHosts}

const nixEtcMode = 0o644

// Name is the worker name the executor puts in results.
func (e *Executor) Name() string { return e.cfg.Name }

// Running is the number of actions running now.
func (e *Executor) Running() int { return len(e.slots) }

// Slots is the number of actions the executor runs at once.
func (e *Executor) Slots() int { return e.cfg.Slots }

// Platform is what the executor advertises: OSFamily, ISA, one nix-system
// per configured system and the nix-features it offers.
func (e *Executor) Platform() *repb.Platform {
	p := &repb.Platform{Properties: []*repb.Platform_Property{
		{Name: PropISA, Value: "x86-64"},
		{Name: PropOSFamily, Value: "linux"},
	}}
	if len(e.cfg.Features) > 0 {
		fs := slices.Clone(e.cfg.Features)
		slices.Sort(fs)
		p.Properties = append(p.Properties, &repb.Platform_Property{Name: PropNixFeatures, Value: strings.Join(fs, ",")})
	}
	for _, s := range e.cfg.Systems {
		p.Properties = append(p.Properties, &repb.Platform_Property{Name: PropNixSystem, Value: s})
	}
	slices.SortStableFunc(p.Properties, func(a, b *repb.Platform_Property) int { return strings.Compare(a.Name, b.Name) })
	return p
}

// Request is one action to execute.
type Request struct {
	// Instance is the REAPI instance name.
	Instance string
	// Action is the digest of the Action message; its function is the
	// digest function of everything the action refers to.
	Action digest.Digest
	// Queued is when the action was queued (for the result's metadata);
	// zero means now.
	Queued time.Time
	// InlineStdout and InlineStderr ask for the streams' bytes in the
	// result when they are small.
	InlineStdout, InlineStderr bool
}

// Execute runs the action and returns the response for the client: the
// result of a command that ran (whatever its exit code), with a
// DEADLINE_EXCEEDED status if it timed out. An error means the action
// could not be run: a gRPC status that is the farm's problem
// (UNAVAILABLE, INTERNAL) or the action's (INVALID_ARGUMENT,
// FAILED_PRECONDITION for missing inputs or an unsupported platform).
func (e *Executor) Execute(ctx context.Context, req *Request) (*repb.ExecuteResponse, error) {
	md := &repb.ExecutedActionMetadata{Worker: e.cfg.Name}
	queued := req.Queued
	if queued.IsZero() {
		queued = time.Now()
	}
	md.QueuedTimestamp = timestamppb.New(queued)
	select {
	case e.slots <- struct{}{}:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	defer func() { <-e.slots }()
	md.WorkerStartTimestamp = timestamppb.Now()

	fn := req.Action.Function()
	action, cmd, err := e.fetchAction(ctx, req.Action)
	if err != nil {
		return nil, err
	}
	plan, err := e.plan(action, cmd)
	if err != nil {
		return nil, err
	}
	in, err := e.sb.Acquire(ctx, plan.shape)
	if err != nil {
		if errors.Is(err, sandbox.ErrUnsupported) {
			return nil, status.Errorf(codes.FailedPrecondition, "action %s: %v", req.Action, err)
		}
		return nil, status.Errorf(codes.Internal, "action %s: %v", req.Action, err)
	}
	defer in.Release()

	md.InputFetchStartTimestamp = timestamppb.Now()
	rootDigest, err := digest.FromProto(fn, action.InputRootDigest)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "action %s: input root digest: %v", req.Action, err)
	}
	uid, gid := in.BuildUser()
	var mopts inputs.MaterializeOptions
	if plan.nix {
		mopts.Place = e.nixPlacement(fn, plan, uid, gid)
	}
	if plan.shape.Overlay == "" {
		if _, err := e.mat.Materialize(ctx, rootDigest, in.InputRoot(), mopts); err != nil {
			return nil, inputError(req.Action, err)
		}
	} else {
		set, _, err := e.cfg.Layers.Materialize(ctx, rootDigest, in.InputRoot(), plan.shape.Overlay, mopts)
		if err != nil {
			set.Release()
			return nil, inputError(req.Action, err)
		}
		if err := in.Overlay(set.Dirs(), set.Release); err != nil {
			return nil, status.Errorf(codes.Internal, "action %s: %v", req.Action, err)
		}
	}
	if err := e.prepareRoot(in.InputRoot(), plan, uid, gid); err != nil {
		return nil, status.Errorf(codes.Internal, "action %s: %v", req.Action, err)
	}
	md.InputFetchCompletedTimestamp = timestamppb.Now()

	res, err := in.Run(ctx, plan.command)
	if err != nil {
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return nil, status.Errorf(codes.Internal, "action %s: %v", req.Action, err)
	}
	md.ExecutionStartTimestamp = timestamppb.New(res.Started)
	md.ExecutionCompletedTimestamp = timestamppb.New(res.Exited)
	md.VirtualExecutionDuration = durationpb.New(res.Exited.Sub(res.Started))

	resp := &repb.ExecuteResponse{Status: status.New(codes.OK, "").Proto()}
	var note string
	switch {
	case res.TimedOut:
		note = fmt.Sprintf("tvixfarm: the action timed out after %s and was killed", plan.command.Timeout)
		resp.Status = status.New(codes.DeadlineExceeded, note).Proto()
	case res.OOMKilled:
		note = "tvixfarm: the action ran out of memory and was killed"
		if plan.shape.Limits.MemoryBytes > 0 {
			note += fmt.Sprintf(" (limit %d bytes)", plan.shape.Limits.MemoryBytes)
		}
	}
	if note != "" {
		resp.Message = note
		log := res.Stderr
		if plan.command.PTY {
			log = res.Stdout
		}
		appendLine(log, note)
	}

	md.OutputUploadStartTimestamp = timestamppb.Now()
	var result *repb.ActionResult
	if res.TimedOut {
		result = &repb.ActionResult{} // outputs of a killed action are not trusted
	} else {
		col, err := outputs.Collect(ctx, e.cas, fn, in.InputRoot(), cmd, outputs.Options{})
		if err != nil {
			if st, ok := status.FromError(err); ok && st.Code() == codes.InvalidArgument {
				// The build produced something REAPI cannot express (a
				// FIFO, a non-UTF-8 name): the action's failure.
				return nil, status.Errorf(codes.FailedPrecondition, "action %s: outputs: %v", req.Action, st.Message())
			}
			return nil, status.Errorf(codes.Unavailable, "action %s: upload outputs: %v", req.Action, err)
		}
		result = col.ActionResult
	}
	result.ExitCode = int32(res.ExitCode)
	if err := e.uploadStream(ctx, fn, res.Stdout, req.InlineStdout, &result.StdoutDigest, &result.StdoutRaw); err != nil {
		return nil, status.Errorf(codes.Unavailable, "action %s: upload stdout: %v", req.Action, err)
	}
	if !plan.command.PTY {
		if err := e.uploadStream(ctx, fn, res.Stderr, req.InlineStderr, &result.StderrDigest, &result.StderrRaw); err != nil {
			return nil, status.Errorf(codes.Unavailable, "action %s: upload stderr: %v", req.Action, err)
		}
	} else {
		result.StderrDigest = digest.Empty(fn).Proto()
	}
	md.OutputUploadCompletedTimestamp = timestamppb.Now()
	md.WorkerCompletedTimestamp = timestamppb.Now()
	result.ExecutionMetadata = md
	resp.Result = result
	e.log.Debug("action done", "action", req.Action, "exit", res.ExitCode, "warm", res.Warm,
		"start", res.Timings.Start, "create", res.Timings.Create, "run", res.Exited.Sub(res.Started))
	return resp, nil
}

// storeDir is where Nix actions have their store paths, relative to the
// input root.
const storeDir = "nix/store"

// plan is how an action will run.
type plan struct {
	shape   sandbox.Shape
	command *sandbox.Command
	nix     bool
	plain   bool     // Config.PlainREAPI: chroot, nothing of Nix
	workDir string   // relative to the input root
	parents []string // of the outputs, relative to the input root
}

func (e *Executor) fetchAction(ctx context.Context, ad digest.Digest) (*repb.Action, *repb.Command, error) {
	action := &repb.Action{}
	if err := e.getProto(ctx, ad, action); err != nil {
		return nil, nil, fmt.Errorf("action: %w", err)
	}
	cd, err := digest.FromProto(ad.Function(), action.CommandDigest)
	if err != nil {
		return nil, nil, status.Errorf(codes.InvalidArgument, "action %s: command digest: %v", ad, err)
	}
	if action.InputRootDigest == nil {
		return nil, nil, status.Errorf(codes.InvalidArgument, "action %s: no input root digest", ad)
	}
	cmd := &repb.Command{}
	if err := e.getProto(ctx, cd, cmd); err != nil {
		return nil, nil, fmt.Errorf("action %s: command: %w", ad, err)
	}
	return action, cmd, nil
}

// getProto reads a message from the CAS. A missing blob is a
// FAILED_PRECONDITION with the violation REAPI prescribes.
func (e *Executor) getProto(ctx context.Context, d digest.Digest, m proto.Message) error {
	if d.Size() > 64<<20 {
		return status.Errorf(codes.InvalidArgument, "%s: message too large", d)
	}
	r, err := e.cas.Get(ctx, d)
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return (&inputs.MissingBlobsError{Digests: []digest.Digest{d}, Paths: []string{"-"}}).GRPCStatus().Err()
		}
		return err
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return status.Errorf(codes.InvalidArgument, "%s: %v", d, err)
	}
	return nil
}

// plan checks the action against this executor and works out the
// sandbox's shape and the command.
func (e *Executor) plan(action *repb.Action, cmd *repb.Command) (*plan, error) {
	platform := action.Platform
	if platform == nil || len(platform.Properties) == 0 {
		platform = cmd.Platform
	}
	props := map[string]string{}
	for _, p := range platform.GetProperties() {
		if _, dup := props[p.Name]; dup && p.Name != PropNixSystem {
			return nil, status.Errorf(codes.InvalidArgument, "platform property %q given twice", p.Name)
		}
		props[p.Name] = p.Value
	}
	p := &plan{}
	var err error
	if err := e.matchPlatform(props); err != nil {
		return nil, err
	}
	_, p.nix = props[PropNixSystem]
	if e.cfg.PlainREAPI {
		// A stock chrooting worker: no Nix treatment, no options.
		p.nix, p.plain = false, true
		for _, o := range OptionProperties {
			delete(props, o)
		}
	}
	if p.nix || p.plain {
		p.shape.Layout = sandbox.Chroot
	} else {
		p.shape.Layout = sandbox.HostRoot
	}
	switch v := props[PropNetwork]; v {
	case "":
	case "true":
		p.shape.Network = sandbox.NetworkHost
	case "false":
		p.shape.Network = sandbox.NetworkNone
	default:
		return nil, status.Errorf(codes.InvalidArgument, "platform property %s=%q: want true or false", PropNetwork, v)
	}
	if p.shape.Limits.MemoryBytes, err = parseSize(props[PropMemoryLimit]); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "platform property %s: %v", PropMemoryLimit, err)
	}
	if min, err := parseSize(props[PropMinMemory]); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "platform property %s: %v", PropMinMemory, err)
	} else if min > 0 {
		if l := p.shape.Limits.MemoryBytes; l > 0 && l < min {
			return nil, status.Errorf(codes.FailedPrecondition, "the action needs %d bytes of memory (%s) but limits itself to %d (%s)", min, PropMinMemory, l, PropMemoryLimit)
		}
		if total := hostMemory(); total > 0 && total < min {
			return nil, status.Errorf(codes.FailedPrecondition, "the action needs %d bytes of memory (%s); worker %s has %d", min, PropMinMemory, e.cfg.Name, total)
		}
	}
	if v := props[PropPidsLimit]; v != "" {
		if p.shape.Limits.Pids, err = strconv.ParseInt(v, 10, 64); err != nil || p.shape.Limits.Pids < 1 {
			return nil, status.Errorf(codes.InvalidArgument, "platform property %s=%q: want a positive integer", PropPidsLimit, v)
		}
	}
	if v := props[PropCPULimit]; v != "" {
		if p.shape.Limits.CPUs, err = strconv.ParseFloat(v, 64); err != nil || p.shape.Limits.CPUs <= 0 {
			return nil, status.Errorf(codes.InvalidArgument, "platform property %s=%q: want a positive number of cores", PropCPULimit, v)
		}
	}
	pty := false
	switch v := props[PropPTY]; v {
	case "", "false":
	case "true":
		pty = true
	default:
		return nil, status.Errorf(codes.InvalidArgument, "platform property %s=%q: want true or false", PropPTY, v)
	}

	if len(cmd.Arguments) == 0 {
		return nil, status.Error(codes.InvalidArgument, "command has no arguments")
	}
	wd := cmd.WorkingDirectory
	if wd != "" {
		// Resolve the working directory as if it were an output of the root.
		if wd, err = outputs.ResolvePath("", wd); err != nil {
			return nil, err
		}
	}
	p.workDir = wd
	p.shape.Writable = []string{wd}
	outs := cmd.OutputPaths
	if len(outs) == 0 {
		outs = append(slices.Clone(cmd.OutputFiles), cmd.OutputDirectories...)
	}
	for _, o := range outs {
		rel, err := outputs.ResolvePath(cmd.WorkingDirectory, o)
		if err != nil {
			return nil, err
		}
		parent := path.Dir(rel)
		if parent == "." {
			parent = ""
		}
		p.parents = append(p.parents, parent)
		if !underDir(parent, wd) {
			p.shape.Writable = append(p.shape.Writable, parent)
		}
	}
	if (p.nix || p.plain) && e.cfg.Layers != nil && slices.ContainsFunc(p.shape.Writable, func(w string) bool { return underDir(storeDir, w) }) {
		p.shape.Overlay = storeDir
	}
	timeout := e.cfg.DefaultTimeout
	if t := action.Timeout; t != nil {
		if err := t.CheckValid(); err != nil || t.AsDuration() < 0 {
			return nil, status.Errorf(codes.InvalidArgument, "invalid timeout %v", t)
		}
		if d := t.AsDuration(); d > 0 {
			timeout = d
		}
	}
	if timeout > e.cfg.MaxTimeout {
		return nil, status.Errorf(codes.InvalidArgument, "timeout %s exceeds this executor's maximum of %s", timeout, e.cfg.MaxTimeout)
	}
	env := make([]string, 0, len(cmd.EnvironmentVariables))
	for _, v := range cmd.EnvironmentVariables {
		if strings.ContainsRune(v.Name, '=') || v.Name == "" {
			return nil, status.Errorf(codes.InvalidArgument, "invalid environment variable name %q", v.Name)
		}
		env = append(env, v.Name+"="+v.Value)
	}
	p.command = &sandbox.Command{Args: cmd.Arguments, Env: env, Dir: wd, PTY: pty, Timeout: timeout}
	if p.nix {
		p.command.Argv0 = path.Base(cmd.Arguments[0])
	}
	return p, nil
}

// matchPlatform checks the properties that select a worker.
func (e *Executor) matchPlatform(props map[string]string) error {
	for name, v := range props {
		switch name {
		case PropOSFamily:
			if v != "linux" {
				return status.Errorf(codes.FailedPrecondition, "platform %s=%s: this executor runs linux", name, v)
			}
		case PropISA:
			if v != "x86-64" {
				return status.Errorf(codes.FailedPrecondition, "platform %s=%s: this executor offers x86-64", name, v)
			}
		case PropNixSystem:
			if !slices.Contains(e.cfg.Systems, v) {
				return status.Errorf(codes.FailedPrecondition, "platform %s=%s: this executor builds for %s", name, v, strings.Join(e.cfg.Systems, ", "))
			}
		case PropNixFeatures:
			for _, f := range strings.Split(v, ",") {
				if f != "" && !slices.Contains(e.cfg.Features, f) {
					return status.Errorf(codes.FailedPrecondition, "platform %s: this executor does not offer %q", name, f)
				}
			}
		}
	}
	return nil
}

// nixPlacement says how a Nix action's input root gets the files that
// Nix's sandbox writes itself rather than bind-mounts from the store: its
// /etc files are 0644 and root's, and the files of /build (passAsFile,
// structured attrs, exportReferencesGraph) 0644 and the build user's, as
// Nix writes them. A hardlink into the input cache would have the cache's
// mode (0444) and owner, which must not change, so /etc files with Nix's
// usual contents are hardlinks to the executor's copies and the others
// private copies; the working directory's files are private copies (the
// build may change them).
func (e *Executor) nixPlacement(fn digest.Function, p *plan, uid, gid int) func(string, digest.Digest, bool) *inputs.Placement {
	return func(rel string, d digest.Digest, executable bool) *inputs.Placement {
		mode := os.FileMode(0o644)
		if executable {
			mode = 0o755
		}
		if dir, name := path.Split(rel); dir == "etc/" {
			content, ok := nixEtc[name]
			if !ok {
				return nil // not Nix's: a sandbox path, bind-mounted by Nix
			}
			pl := &inputs.Placement{Mode: mode}
			if e.cfg.Dir != "" && !executable && d == digest.Compute(fn, []byte(content)) {
				pl.LinkTo = filepath.Join(e.cfg.Dir, "etc", name)
			}
			return pl
		}
		if p.workDir != "" && underDir(rel, p.workDir) && !underDir(rel, storeDir) {
			return &inputs.Placement{Mode: mode, UID: uid, GID: gid}
		}
		return nil
	}
}

// prepareRoot makes the writable directories writable for the build user
// (host uid and gid) and gives a chroot the /etc files Nix's sandbox has,
// when the input root has none. The working directory belongs to the
// build user; other writable directories (such as /nix/store) are root's
// and group-writable with the sticky bit, as Nix's /nix/store is, so that
// the build can add its outputs but not touch its inputs. A chroot's root
// directory is root's and the build group's, 0750, as Nix's is.
func (e *Executor) prepareRoot(root string, p *plan, uid, gid int) error {
	wd := filepath.Join(root, p.workDir)
	mode := os.FileMode(0o755)
	if p.nix {
		mode = 0o700
		if err := os.Chown(root, 0, gid); err != nil {
			return err
		}
		if err := os.Chmod(root, 0o750); err != nil {
			return err
		}
	}
	if err := os.Chown(wd, uid, gid); err != nil {
		return err
	}
	if err := os.Chmod(wd, mode); err != nil {
		return err
	}
	{
		// Builds write next to their inputs in the working tree (Nix's
		// /build is the builder's): its directories belong to the build
		// user. Its files are the build user's in Nix actions (see
		// nixPlacement), else read-only and root's (hardlinks into the
		// input cache).
		err := filepath.WalkDir(wd, func(path string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() || path == wd {
				return err
			}
			return os.Lchown(path, uid, gid)
		})
		if err != nil {
			return err
		}
	}
	for _, d := range p.parents {
		if !underDir(d, p.workDir) {
			d = filepath.Join(root, d)
			if err := os.Chown(d, 0, gid); err != nil {
				return err
			}
			if err := os.Chmod(d, 0o775|os.ModeSticky); err != nil {
				return err
			}
			continue
		}
		// REAPI: the executor creates the parents of the outputs.
		var missing []string
		for rel := d; rel != p.workDir && rel != "" && rel != "."; rel = path.Dir(rel) {
			missing = append(missing, rel)
		}
		for i := len(missing) - 1; i >= 0; i-- {
			full := filepath.Join(root, missing[i])
			if fi, err := os.Lstat(full); err == nil {
				if !fi.IsDir() {
					return fmt.Errorf("parent of output: %s is not a directory", missing[i])
				}
				continue
			}
			if err := os.Mkdir(full, 0o755); err != nil {
				return fmt.Errorf("output directory %s: %w", missing[i], err)
			}
			if err := os.Chown(full, uid, gid); err != nil {
				return err
			}
		}
	}
	if p.nix {
		etc := filepath.Join(root, "etc")
		if err := os.MkdirAll(etc, 0o755); err != nil {
			return err
		}
		for name, content := range nixEtc {
			f := filepath.Join(etc, name)
			if _, err := os.Lstat(f); !errors.Is(err, os.ErrNotExist) {
				continue
			}
			if e.cfg.Dir != "" && os.Link(filepath.Join(e.cfg.Dir, "etc", name), f) == nil {
				continue
			}
			if err := os.WriteFile(f, []byte(content), nixEtcMode); err != nil {
				return err
			}
			if err := os.Chmod(f, nixEtcMode); err != nil {
				return err
			}
		}
	}
	return nil
}

// underDir reports whether p is dir or below it ("" is the input root).
func underDir(p, dir string) bool {
	return dir == "" || p == dir || strings.HasPrefix(p, dir+"/")
}

// uploadStream stores a captured stream and inlines it when asked and
// small enough.
func (e *Executor) uploadStream(ctx context.Context, fn digest.Function, file string, inline bool, dp **repb.Digest, raw *[]byte) error {
	d, err := outputs.UploadFile(ctx, e.cas, fn, file)
	if err != nil {
		return err
	}
	*dp = d.Proto()
	if inline && d.Size() <= e.cfg.InlineLimit {
		if *raw, err = os.ReadFile(file); err != nil {
			return err
		}
	}
	return nil
}

func appendLine(file, line string) {
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "\n%s\n", line)
}

// inputError maps an error of materialising the input root to a status.
func inputError(ad digest.Digest, err error) error {
	var missing *inputs.MissingBlobsError
	if errors.As(err, &missing) {
		return missing.GRPCStatus().Err()
	}
	if st, ok := status.FromError(err); ok && st.Code() == codes.InvalidArgument {
		return status.Errorf(codes.InvalidArgument, "action %s: input root: %s", ad, st.Message())
	}
	return status.Errorf(codes.Unavailable, "action %s: input root: %v", ad, err)
}

// parseSize parses a byte count with an optional K, M, G or T suffix
// (powers of 1024).
func parseSize(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	mult := int64(1)
	switch strings.ToUpper(s[len(s)-1:]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	case "T":
		mult = 1 << 40
	}
	if mult > 1 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a positive size", s)
	}
	return n * mult, nil
}

// hostMemory is the host's MemTotal in bytes, 0 if unknown.
func hostMemory() int64 {
	data, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return n << 10
				}
			}
		}
	}
	return 0
}
