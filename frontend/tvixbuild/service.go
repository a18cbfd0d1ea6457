// Package tvixbuild is the Tvix and Snix BuildService (tvix.build.v1 and
// snix.build.v1 DoBuild): it turns a BuildRequest into a REAPI action,
// runs it on the farm's scheduler like any other action, and answers with
// the outputs as castore nodes and the refscan needles found in them.
//
// A BuildRequest names its inputs by castore node. Tvix clients send only
// the direct inputs, Snix clients the whole runtime closure; the service
// expands every input under nix/store through the farm's path-info store,
// so both get the closure Nix would give the builder. The input root is
// the farm's REAPI tree of each input (castore and REAPI share blobs, not
// directories: Trees converts), the additional files, the scratch and
// working directories and, if asked, /bin/sh. The executor runs actions
// whose platform has nix-system as it runs Nix builds: chrooted into the
// input root, Nix's /etc files, uid 1000 in its own user namespace, no
// network unless network_access.
//
// A build that fails (the builder's exit code, a missing output) is an
// INTERNAL error that says why, with the digests of its stdout and stderr
// in the farm's CAS and the tail of its log, as Tvix clients expect a
// failed build to be reported.
package tvixbuild

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/frontend/reapiexec"
	"tvixfarm/frontend/translate"
	buildpb "tvixfarm/proto/tvix/build/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// Trees converts between castore trees and the farm's REAPI trees (BLAKE3
// digests; the blobs are the same).
type Trees interface {
	// ToREAPI returns the REAPI form of the castore node n, whose trees
	// must then be in the CAS.
	ToREAPI(ctx context.Context, n *castorepb.Node) (nar.Node, error)
	// ToCastore stores the castore form of the REAPI node n and returns
	// it with the given name.
	ToCastore(ctx context.Context, n nar.Node, name []byte) (*castorepb.Node, error)
}

// Config is what the service builds with.
type Config struct {
	// CAS is the farm's CAS, which the executors read: input roots and
	// outputs are BLAKE3 blobs of it.
	CAS blobstore.BlobAccess
	// Paths expands inputs into their closures; nil: inputs are taken as
	// they are (the client sent the closure).
	Paths pathinfo.Store
	// Trees converts castore nodes.
	Trees Trees
	// Execution runs the actions (the farm's own scheduler).
	Execution repb.ExecutionClient
	// Instance is the REAPI instance name of the actions.
	Instance string
	// BinSh is the static shell placed at /bin/sh for requests with
	// provide_bin_sh (it must be in CAS); nil: such requests are refused.
	BinSh *translate.File
	// DefaultSystem is the nix-system of requests without constraints
	// (default x86_64-linux).
	DefaultSystem string
	// Timeout bounds each build (default 3 h).
	Timeout time.Duration
	// Logger; nil: slog.Default().
	Logger *slog.Logger
}

// Service runs BuildRequests.
type Service struct {
	cfg Config
	log *slog.Logger
}

// New returns a Service.
func New(cfg Config) *Service {
	if cfg.DefaultSystem == "" {
		cfg.DefaultSystem = "x86_64-linux"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 3 * time.Hour
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Service{cfg: cfg, log: log}
}

// Result is a successful build: for each requested output, in request
// order, its castore node (named by the output path's last component) and
// the indexes of the refscan needles found in it.
type Result struct {
	Outputs []*castorepb.Node
	Needles [][]uint64
}

const fn = digest.BLAKE3

// PropMinMemory carries BuildConstraints.min_memory to the executor
// (executor.PropMinMemory), which refuses the action if it has less.
const PropMinMemory = "min-memory"

// logTailLines is how much of a failed build's log its error shows.
const logTailLines = 10

// Build runs req. Errors are gRPC status errors.
func (s *Service) Build(ctx context.Context, req *buildpb.BuildRequest) (*Result, error) {
	if err := Validate(req); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "build request: %v", err)
	}
	c := req.GetConstraints()
	if len(c.GetAvailableRoPaths()) > 0 {
		return nil, status.Errorf(codes.Unimplemented, "build request: available_ro_paths (%s) are not supported by this farm", strings.Join(c.GetAvailableRoPaths(), ", "))
	}
	blobs := map[digest.Digest][]byte{}
	root, err := s.inputRoot(ctx, req, blobs)
	if err != nil {
		return nil, err
	}
	act, outPaths, err := s.action(req, root, blobs)
	if err != nil {
		return nil, err
	}
	if err := errors.Join(blobstore.PutBatch(ctx, s.cfg.CAS, blobList(blobs))...); err != nil {
		return nil, status.Errorf(codes.Internal, "build: storing the action: %v", err)
	}
	resp, err := reapiexec.Run(ctx, s.cfg.Execution, &repb.ExecuteRequest{
		InstanceName:   s.cfg.Instance,
		ActionDigest:   act.Proto(),
		DigestFunction: fn.Proto(),
	}, reapiexec.Options{Logger: s.log})
	if err != nil {
		return nil, fmt.Errorf("build: %w", err)
	}
	if st := status.FromProto(resp.GetStatus()); st.Code() != codes.OK {
		return nil, st.Err()
	}
	res := resp.GetResult()
	if res.GetExitCode() != 0 {
		return nil, status.Errorf(codes.Internal, "build failed: the builder exited with code %d%s", res.GetExitCode(), s.logPointer(ctx, res))
	}
	out := &Result{}
	for i, p := range req.Outputs {
		nd, ok, err := nar.FromActionResult(ctx, s.cfg.CAS, fn, res, outPaths[i])
		if err != nil {
			return nil, status.Errorf(codes.Internal, "build: output %s: %v", p, err)
		}
		if !ok {
			return nil, status.Errorf(codes.Internal, "build failed: the builder did not produce output %s%s", p, s.logPointer(ctx, res))
		}
		needles, err := scanNeedles(ctx, s.cfg.CAS, nd, req.RefscanNeedles)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "build: output %s: scanning for references: %v", p, err)
		}
		cn, err := s.cfg.Trees.ToCastore(ctx, nd, []byte(path.Base(p)))
		if err != nil {
			return nil, status.Errorf(codes.Internal, "build: output %s: %v", p, err)
		}
		out.Outputs = append(out.Outputs, cn)
		out.Needles = append(out.Needles, needles)
	}
	return out, nil
}

// logPointer says where a failed build's log is, with its tail.
func (s *Service) logPointer(ctx context.Context, res *repb.ActionResult) string {
	var b strings.Builder
	var tail []byte
	for _, st := range []struct {
		name string
		d    *repb.Digest
		raw  []byte
	}{{"stdout", res.GetStdoutDigest(), res.GetStdoutRaw()}, {"stderr", res.GetStderrDigest(), res.GetStderrRaw()}} {
		d, err := digest.FromProto(fn, st.d)
		if err != nil || d.Size() == 0 {
			continue
		}
		fmt.Fprintf(&b, "; %s in the farm's CAS: blake3 %s (%d bytes)", st.name, d.Hex(), d.Size())
		data := st.raw
		if data == nil && d.Size() <= 1<<20 {
			if r, err := s.cfg.CAS.Get(ctx, d); err == nil {
				data, _ = io.ReadAll(r)
				r.Close()
			}
		}
		tail = append(tail, data...)
	}
	if lines := coordinator.Tail(tail, logTailLines); len(lines) > 0 {
		b.WriteString("; last log lines:\n> " + strings.Join(lines, "\n> "))
	}
	return b.String()
}

// inputRoot builds the REAPI input root of req and returns its digest;
// the Directory messages and small files it creates are added to blobs.
func (s *Service) inputRoot(ctx context.Context, req *buildpb.BuildRequest, blobs map[digest.Digest][]byte) (digest.Digest, error) {
	t := newTree()
	inDir := req.GetInputsDir()
	placed := map[string]bool{}
	for _, in := range req.GetInputs() {
		name := string(castore.NodeName(in))
		n, err := s.cfg.Trees.ToREAPI(ctx, in)
		if err != nil {
			return digest.Digest{}, status.Errorf(status.Code(err), "build request: input %s: %v", name, err)
		}
		if err := t.place(join(inDir, name), n); err != nil {
			return digest.Digest{}, status.Errorf(codes.InvalidArgument, "build request: %v", err)
		}
		placed[name] = true
	}
	if inDir == strings.TrimPrefix(translate.StoreDir, "/") && s.cfg.Paths != nil {
		if err := s.closure(ctx, t, inDir, placed); err != nil {
			return digest.Digest{}, err
		}
	}
	dirs := append([]string{req.GetWorkingDir(), "tmp"}, req.GetScratchPaths()...)
	for _, d := range dirs {
		if _, err := t.mkdirAll(d); err != nil {
			return digest.Digest{}, status.Errorf(codes.InvalidArgument, "build request: %v", err)
		}
	}
	for _, f := range req.GetAdditionalFiles() {
		d := digest.Compute(fn, f.Contents)
		blobs[d] = f.Contents
		if err := t.place(f.Path, nar.FileNode(d, false)); err != nil {
			return digest.Digest{}, status.Errorf(codes.InvalidArgument, "build request: additional file: %v", err)
		}
	}
	if req.GetConstraints().GetProvideBinSh() {
		if s.cfg.BinSh == nil {
			return digest.Digest{}, status.Error(codes.FailedPrecondition, "build request: provide_bin_sh, but this farm has no static shell to provide (install busybox-static)")
		}
		if err := t.place("bin/sh", nar.FileNode(s.cfg.BinSh.Digest, true)); err != nil {
			return digest.Digest{}, status.Errorf(codes.InvalidArgument, "build request: /bin/sh: %v", err)
		}
	}
	root, err := t.finish(fn, blobs)
	if err != nil {
		return digest.Digest{}, status.Errorf(codes.Internal, "build: input root: %v", err)
	}
	return root, nil
}

// closure adds to t the runtime closure of the inputs placed under
// nix/store, from the farm's path-info store. Inputs the store does not
// know are taken as they are; a reference the store does not have is an
// error.
func (s *Service) closure(ctx context.Context, t *tree, inDir string, placed map[string]bool) error {
	next := make([]string, 0, len(placed))
	for name := range placed {
		next = append(next, translate.StoreDir+"/"+name)
	}
	seen := map[string]bool{}
	for len(next) > 0 {
		infos, err := s.cfg.Paths.Get(ctx, next)
		if err != nil {
			return status.Errorf(status.Code(err), "build: input closure: %v", err)
		}
		var more []string
		for _, p := range next {
			seen[p] = true
			info, ok := infos[p]
			if !ok {
				if !placed[path.Base(p)] {
					return status.Errorf(codes.FailedPrecondition, "build request: an input refers to %s, which the farm does not have", p)
				}
				continue
			}
			if name := path.Base(p); !placed[name] {
				n, err := coordinator.NarNode(info.Node)
				if err != nil {
					return status.Errorf(codes.Internal, "build: input %s: %v", p, err)
				}
				if n.Type != nar.Symlink && n.Digest.Function() != fn {
					return status.Errorf(codes.FailedPrecondition, "build request: input %s is stored with %s digests; Tvix builds need BLAKE3 (build it with tvixfarm build --digest-function blake3)", p, n.Digest.Function())
				}
				if err := t.place(join(inDir, name), n); err != nil {
					return status.Errorf(codes.Internal, "build: %v", err)
				}
				placed[name] = true
			}
			for _, r := range info.References {
				if !seen[r] {
					seen[r] = true
					more = append(more, r)
				}
			}
		}
		next = more
	}
	return nil
}

// action builds and adds to blobs the Command and Action of req, and
// returns the Action's digest and each output's REAPI path (relative to
// the working directory).
func (s *Service) action(req *buildpb.BuildRequest, root digest.Digest, blobs map[digest.Digest][]byte) (digest.Digest, []string, error) {
	up := strings.Repeat("../", strings.Count(req.WorkingDir, "/")+min(1, len(req.WorkingDir)))
	outs := make([]string, len(req.Outputs))
	for i, p := range req.Outputs {
		outs[i] = up + p
	}
	sorted := append([]string(nil), outs...)
	sort.Strings(sorted)
	cmd := &repb.Command{
		Arguments:        req.CommandArgs,
		OutputPaths:      sorted,
		WorkingDirectory: req.WorkingDir,
	}
	for _, e := range req.EnvironmentVars {
		if !utf8.Valid(e.Value) {
			return digest.Digest{}, nil, status.Errorf(codes.InvalidArgument, "build request: the value of %s is not UTF-8, which REAPI cannot carry", e.Key)
		}
		cmd.EnvironmentVariables = append(cmd.EnvironmentVariables, &repb.Command_EnvironmentVariable{Name: e.Key, Value: string(e.Value)})
	}
	system := s.cfg.DefaultSystem
	if c := req.GetConstraints(); c != nil {
		system = c.System
	}
	props := []*repb.Platform_Property{{Name: translate.PropNixSystem, Value: system}}
	if req.GetConstraints().GetNetworkAccess() {
		props = append(props, &repb.Platform_Property{Name: translate.PropNetwork, Value: "true"})
	}
	if m := req.GetConstraints().GetMinMemory(); m > 0 {
		props = append(props, &repb.Platform_Property{Name: PropMinMemory, Value: strconv.FormatUint(m, 10)})
	}
	sort.Slice(props, func(i, j int) bool { return props[i].Name < props[j].Name })
	cmd.Platform = &repb.Platform{Properties: props}
	cd, err := putProto(fn, cmd, blobs)
	if err != nil {
		return digest.Digest{}, nil, status.Errorf(codes.InvalidArgument, "build request: %v", err)
	}
	act := &repb.Action{
		CommandDigest:   cd.Proto(),
		InputRootDigest: root.Proto(),
		Timeout:         durationpb.New(s.cfg.Timeout),
		Platform:        proto.Clone(cmd.Platform).(*repb.Platform),
	}
	ad, err := putProto(fn, act, blobs)
	if err != nil {
		return digest.Digest{}, nil, status.Errorf(codes.Internal, "build: %v", err)
	}
	return ad, outs, nil
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}
