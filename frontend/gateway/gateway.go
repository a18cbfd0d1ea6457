// Package gateway is tvixfarm's gateway mode: the farm serves REAPI
// Execution and Operations to its clients (tvixfarm build --farm works
// unchanged) but runs each action on another REAPI cluster, such as
// Buildbarn, instead of on its own scheduler.
//
// For each action, Remote reads the Action and Command from the gateway's
// CAS, checks them against what the remote can give (fixed-output
// derivations need the network; ordinary derivations must have none),
// rewrites the platform (only the properties a stock worker matches, plus
// the configured ones) and the timeout, uploads what the remote's CAS
// lacks (FindMissingBlobs first, small blobs batched, large ones over
// ByteStream), executes it there (resuming a dropped stream with
// WaitExecution by operation name, retrying UNAVAILABLE with backoff), and
// copies the result's blobs (output files, output trees and their files,
// stdout and stderr) back into the gateway's CAS before the operation
// completes. The client reads its outputs from the gateway's CAS as from
// any farm; the gateway keeps path info, logs and the binary cache.
//
// The remote is used as a plain REAPI server: no GetTree (the gateway
// walks its own trees), batch limits from its capabilities
// (max_batch_total_size_bytes 0 means unknown: 4 MiB), output_paths and
// the platform on both the Action and the Command (REAPI ≥ 2.2), results
// with tree_digest or root_directory_digest. Digests are not translated:
// the remote must support the digest function of the actions (checked at
// start by New; other actions are refused).
package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/google/uuid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
	"tvixfarm/frontend/translate"
)

// Config configures a Remote. Zero fields take the defaults named.
type Config struct {
	// Address names the remote in messages and status.
	Address string
	// Instance is the remote's instance name.
	Instance string
	// DigestFunction is the one function of the actions the gateway
	// forwards (default BLAKE3).
	DigestFunction digest.Function
	// Platform properties are added to every action, replacing the
	// action's of the same name.
	Platform map[string]string
	// PassProperties are the action's platform properties kept; the
	// others are dropped.
	PassProperties []string
	// Concurrency bounds the actions forwarded at once (default 64).
	Concurrency int
	// ActionTimeout is set on actions without a timeout (default 3h).
	ActionTimeout time.Duration
	// RPCTimeout bounds each unary RPC to the remote (default 1m). An
	// Execute or WaitExecution stream is bounded by the action's timeout
	// plus StreamSlack, after which it is resumed with WaitExecution.
	RPCTimeout time.Duration
	// StreamSlack is added to the action's timeout for the deadline of
	// one Execute or WaitExecution stream (default 10m).
	StreamSlack time.Duration
	// IsolatedNetwork, AllowUnisolated and AllowFixedOutput are the
	// network policy: see Remote.Execute.
	IsolatedNetwork, AllowUnisolated, AllowFixedOutput bool
	// Retain is how long completed operations can be queried (default
	// 10m).
	Retain time.Duration
	// RetryDelay is the first backoff of a retried remote call (default
	// 100 ms); it doubles up to 5 s, with jitter.
	RetryDelay time.Duration
	// MaxAttempts bounds the consecutive failed attempts of one remote
	// execution (default 10).
	MaxAttempts int
	Logger      *slog.Logger
}

// Remote is the remote execution backend: the REAPI Execution and
// Operations services of a gateway.
type Remote struct {
	repb.UnimplementedExecutionServer
	longrunningpb.UnimplementedOperationsServer

	cfg   Config
	log   *slog.Logger
	local *blobstore.Instances
	rcas  blobstore.BlobAccess
	rexec repb.ExecutionClient
	rops  longrunningpb.OperationsClient
	rcaps repb.CapabilitiesClient
	sem   chan struct{}
	ops   *ops
	known *present
	caps  *repb.ServerCapabilities
	ctx   context.Context // ends with Close: every operation's parent
	stop  context.CancelFunc

	forwarded, failed atomic.Int64
}

// New connects the gateway's stores to the remote reached through conn.
// It reads the remote's capabilities (waiting up to RPCTimeout for it to
// answer) and refuses a remote that cannot execute, or that does not
// support the digest function.
func New(ctx context.Context, conn grpc.ClientConnInterface, local *blobstore.Instances, cfg Config) (*Remote, error) {
	if cfg.DigestFunction == 0 {
		cfg.DigestFunction = digest.BLAKE3
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 64
	}
	if cfg.ActionTimeout <= 0 {
		cfg.ActionTimeout = 3 * time.Hour
	}
	if cfg.RPCTimeout <= 0 {
		cfg.RPCTimeout = time.Minute
	}
	if cfg.StreamSlack <= 0 {
		cfg.StreamSlack = 10 * time.Minute
	}
	if cfg.Retain <= 0 {
		cfg.Retain = 10 * time.Minute
	}
	if cfg.RetryDelay <= 0 {
		cfg.RetryDelay = 100 * time.Millisecond
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 10
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	g := &Remote{
		cfg: cfg, log: log, local: local,
		rexec: repb.NewExecutionClient(conn),
		rops:  longrunningpb.NewOperationsClient(conn),
		rcaps: repb.NewCapabilitiesClient(conn),
		sem:   make(chan struct{}, cfg.Concurrency),
		ops:   newOps(cfg.Retain),
		known: newPresent(1 << 20),
	}
	cctx, cancel := context.WithTimeout(ctx, cfg.RPCTimeout)
	defer cancel()
	caps, err := g.rcaps.GetCapabilities(cctx, &repb.GetCapabilitiesRequest{InstanceName: cfg.Instance}, grpc.WaitForReady(true))
	if err != nil {
		return nil, fmt.Errorf("remote execution backend %s: capabilities: %w", cfg.Address, err)
	}
	if err := checkCapabilities(caps, cfg.DigestFunction); err != nil {
		return nil, fmt.Errorf("remote execution backend %s: %w", cfg.Address, err)
	}
	g.caps = caps
	g.rcas = blobstore.NewGRPC(conn, cfg.Instance, blobstore.GRPCOptions{
		Timeout: cfg.RPCTimeout,
		// 0 is "no limit known": the client's 4 MiB default.
		MaxBatchTotalSize: caps.GetCacheCapabilities().GetMaxBatchTotalSizeBytes(),
		RetryDelay:        cfg.RetryDelay,
	})
	g.ctx, g.stop = context.WithCancel(context.WithoutCancel(ctx))
	log.Info("gateway: remote execution backend", "address", cfg.Address, "instance", cfg.Instance,
		"digest_function", cfg.DigestFunction.String(), "api", apiVersion(caps),
		"max_batch_total_size_bytes", caps.GetCacheCapabilities().GetMaxBatchTotalSizeBytes())
	return g, nil
}

// checkCapabilities refuses a remote that cannot run the gateway's
// actions.
func checkCapabilities(caps *repb.ServerCapabilities, fn digest.Function) error {
	ec := caps.GetExecutionCapabilities()
	if ec == nil || !ec.GetExecEnabled() {
		return errors.New("the server does not offer remote execution (exec_enabled is false)")
	}
	if hi := caps.GetHighApiVersion(); hi != nil && hi.Major == 2 && hi.Minor < 1 {
		return fmt.Errorf("the server speaks REAPI up to %d.%d; the gateway needs 2.1 (output_paths)", hi.Major, hi.Minor)
	}
	execFns := slices.Clone(ec.GetDigestFunctions())
	if len(execFns) == 0 {
		execFns = []repb.DigestFunction_Value{ec.GetDigestFunction()}
	}
	casFns := caps.GetCacheCapabilities().GetDigestFunctions()
	if !slices.Contains(execFns, fn.Proto()) || len(casFns) > 0 && !slices.Contains(casFns, fn.Proto()) {
		var names []string
		for _, f := range execFns {
			names = append(names, strings.ToLower(f.String()))
		}
		return fmt.Errorf("the server executes with digest functions %s, not %s: set execution.remote.digest_function to one of them and build with tvixfarm build --digest-function (the gateway does not translate digests)",
			strings.Join(names, ", "), fn)
	}
	return nil
}

func apiVersion(caps *repb.ServerCapabilities) string {
	lo, hi := caps.GetLowApiVersion(), caps.GetHighApiVersion()
	if hi == nil {
		return "unknown"
	}
	return fmt.Sprintf("%d.%d-%d.%d", lo.GetMajor(), lo.GetMinor(), hi.GetMajor(), hi.GetMinor())
}

// Close cancels every running operation.
func (g *Remote) Close() error {
	g.stop()
	return nil
}

// Capabilities are the execution capabilities the gateway announces: the
// remote's digest function only.
func (g *Remote) Capabilities() *repb.ExecutionCapabilities {
	return &repb.ExecutionCapabilities{
		DigestFunction:  g.cfg.DigestFunction.Proto(),
		DigestFunctions: []repb.DigestFunction_Value{g.cfg.DigestFunction.Proto()},
		ExecEnabled:     true,
		ExecutionPriorityCapabilities: &repb.PriorityCapabilities{
			Priorities: []*repb.PriorityCapabilities_PriorityRange{{MinPriority: -1 << 20, MaxPriority: 1 << 20}},
		},
	}
}

// Status is the backend's state, for farmctl status.
type Status struct {
	Address, Instance, DigestFunction, APIVersion string
	// Healthy is set when the remote answered GetCapabilities just now;
	// Error says why not.
	Healthy bool
	Error   string
	// Concurrency is the limit; Queued and Executing the operations now.
	Concurrency, Queued, Executing int
	// Forwarded and Failed count the actions run on the remote since the
	// start, and those that failed there (not counting builds that ran
	// and failed).
	Forwarded, Failed int64
}

// Status asks the remote for its capabilities and reports the backend.
func (g *Remote) Status(ctx context.Context) Status {
	s := Status{Address: g.cfg.Address, Instance: g.cfg.Instance, DigestFunction: g.cfg.DigestFunction.String(),
		APIVersion: apiVersion(g.caps), Concurrency: g.cfg.Concurrency,
		Forwarded: g.forwarded.Load(), Failed: g.failed.Load()}
	s.Queued, s.Executing = g.ops.counts()
	cctx, cancel := context.WithTimeout(ctx, min(g.cfg.RPCTimeout, 5*time.Second))
	defer cancel()
	caps, err := g.rcaps.GetCapabilities(cctx, &repb.GetCapabilitiesRequest{InstanceName: g.cfg.Instance})
	if err == nil {
		err = checkCapabilities(caps, g.cfg.DigestFunction)
	}
	if err != nil {
		s.Error = err.Error()
	} else {
		s.Healthy = true
	}
	return s
}

// Execute forwards an action to the remote, or answers from the gateway's
// action cache. The network policy:
//
//   - a fixed-output derivation (platform network=true) needs the network:
//     refused unless AllowFixedOutput;
//   - a Nix derivation that is not fixed-output (nix-system set), or any
//     action asking for network=false, must run without network: refused
//     unless IsolatedNetwork (the remote's workers have none) or
//     AllowUnisolated.
//
// Refusals are FAILED_PRECONDITION naming the derivation (the request's
// RequestMetadata target_id, which tvixfarm build sets to the .drv path).
func (g *Remote) Execute(req *repb.ExecuteRequest, stream grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	ctx := stream.Context()
	fn, err := grpcservers.RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return err
	}
	ad, err := digest.FromProto(fn, req.ActionDigest)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "action digest: %v", err)
	}
	what := describe(ctx, ad)
	if fn != g.cfg.DigestFunction {
		return status.Errorf(codes.FailedPrecondition, "%s: the action uses digest function %s, but this gateway's remote execution backend uses %s (build with --digest-function %s)",
			what, fn, g.cfg.DigestFunction, g.cfg.DigestFunction)
	}
	st := g.local.For(req.InstanceName)
	rctx, cancel := context.WithTimeout(ctx, g.cfg.RPCTimeout)
	defer cancel()
	if !req.SkipCacheLookup {
		res, err := grpcservers.GetActionResult(rctx, st, ad)
		if err == nil {
			o := newOp("operations/cached-"+uuid.NewString(), "", ad, func() {})
			o.finish(&repb.ExecuteResponse{Result: res, CachedResult: true, Status: status.New(codes.OK, "").Proto()}, nil)
			lop, _ := o.snapshot()
			return stream.Send(lop)
		}
		if !blobstore.IsNotFound(err) {
			g.log.Warn("gateway: action cache lookup failed; executing", "action", ad.Sprint(), "err", err)
		}
	}
	action, cmd, err := g.readAction(rctx, st.CAS, ad)
	if err != nil {
		return err
	}
	if err := g.policy(what, action, cmd); err != nil {
		return err
	}
	key := req.InstanceName + "/" + ad.String()
	o, _ := g.ops.join(key, func() *op {
		octx, cancel := context.WithCancel(g.ctx)
		o := newOp("operations/"+uuid.NewString(), key, ad, cancel)
		go g.run(octx, o, st, ad, action, cmd, req, what)
		return o
	})
	return g.follow(ctx, stream, o)
}

// WaitExecution follows an operation until it completes.
func (g *Remote) WaitExecution(req *repb.WaitExecutionRequest, stream grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	o, ok := g.ops.get(req.Name)
	if !ok {
		return notFound(req.Name)
	}
	return g.follow(stream.Context(), stream, o)
}

// follow streams the operation's stages until it completes, resending the
// state every 30 s so that proxies keep the stream open.
func (g *Remote) follow(ctx context.Context, stream grpc.ServerStreamingServer[longrunningpb.Operation], o *op) error {
	keepalive := time.NewTicker(30 * time.Second)
	defer keepalive.Stop()
	for {
		lop, ch := o.snapshot()
		if err := stream.Send(lop); err != nil {
			return err
		}
		if lop.Done {
			return nil
		}
		select {
		case <-ch:
		case <-keepalive.C:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

// requestMetadataKey is the REAPI RequestMetadata header.
const requestMetadataKey = "build.bazel.remote.execution.v2.requestmetadata-bin"

// describe names the action in errors: the derivation the client says it
// builds (RequestMetadata target_id), else the action digest.
func describe(ctx context.Context, ad digest.Digest) string {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get(requestMetadataKey) {
		var rm repb.RequestMetadata
		if proto.Unmarshal([]byte(v), &rm) == nil && rm.TargetId != "" {
			return "derivation " + rm.TargetId
		}
	}
	return "action " + ad.Sprint()
}

// readAction reads the Action and its Command from the gateway's CAS.
func (g *Remote) readAction(ctx context.Context, cas blobstore.BlobAccess, ad digest.Digest) (*repb.Action, *repb.Command, error) {
	action := &repb.Action{}
	if err := getProto(ctx, cas, ad, action); err != nil {
		return nil, nil, err
	}
	cd, err := digest.FromProto(ad.Function(), action.CommandDigest)
	if err != nil {
		return nil, nil, status.Errorf(codes.InvalidArgument, "action %s: command digest: %v", ad, err)
	}
	if action.InputRootDigest == nil {
		return nil, nil, status.Errorf(codes.InvalidArgument, "action %s: no input root digest", ad)
	}
	cmd := &repb.Command{}
	if err := getProto(ctx, cas, cd, cmd); err != nil {
		return nil, nil, err
	}
	return action, cmd, nil
}

// getProto reads a message; a missing blob is FAILED_PRECONDITION with a
// MISSING violation, as REAPI prescribes.
func getProto(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest, m proto.Message) error {
	data, err := blobstore.GetBytes(ctx, cas, d, 64<<20)
	if err != nil {
		if blobstore.IsNotFound(err) {
			return missing(d)
		}
		return err
	}
	if err := proto.Unmarshal(data, m); err != nil {
		return status.Errorf(codes.InvalidArgument, "%s: %v", d, err)
	}
	return nil
}

func missing(d digest.Digest) error {
	st, _ := status.New(codes.FailedPrecondition, "missing blob "+d.String()).WithDetails(&errdetails.PreconditionFailure{
		Violations: []*errdetails.PreconditionFailure_Violation{{Type: "MISSING", Subject: "blobs/" + d.Hex() + "/" + fmt.Sprint(d.Size())}},
	})
	return st.Err()
}

// platformOf returns the action's platform properties (the Action's, as
// REAPI ≥ 2.2 has them, else the Command's).
func platformOf(action *repb.Action, cmd *repb.Command) map[string]string {
	p := action.GetPlatform()
	if len(p.GetProperties()) == 0 {
		p = cmd.GetPlatform()
	}
	props := map[string]string{}
	for _, pp := range p.GetProperties() {
		if old, ok := props[pp.Name]; ok {
			props[pp.Name] = old + "," + pp.Value
			continue
		}
		props[pp.Name] = pp.Value
	}
	return props
}

// policy refuses actions whose network needs the remote cannot meet.
func (g *Remote) policy(what string, action *repb.Action, cmd *repb.Command) error {
	props := platformOf(action, cmd)
	_, nix := props[translate.PropNixSystem]
	switch props[translate.PropNetwork] {
	case "true":
		if !g.cfg.AllowFixedOutput {
			return status.Errorf(codes.FailedPrecondition, "%s is a fixed-output derivation: it needs network access, which this gateway does not use its remote execution backend for (set execution.remote.allow_fixed_output: true if the remote's workers have network access)", what)
		}
	case "false":
		nix = true
	}
	if nix && props[translate.PropNetwork] != "true" && !g.cfg.IsolatedNetwork && !g.cfg.AllowUnisolated {
		return status.Errorf(codes.FailedPrecondition, "%s must build without network access, which the remote execution backend does not promise (set execution.remote.isolated_network: true if its workers have no network, or allow_unisolated: true to build anyway)", what)
	}
	return nil
}

// rewrite returns the Action and Command sent to the remote: the
// platform is the passed properties plus the configured ones, on both the
// Action and the Command; the timeout is set if the action has none.
func (g *Remote) rewrite(action *repb.Action, cmd *repb.Command) (*repb.Action, *repb.Command) {
	props := platformOf(action, cmd)
	out := map[string]string{}
	for _, k := range g.cfg.PassProperties {
		if v, ok := props[k]; ok {
			out[k] = v
		}
	}
	for k, v := range g.cfg.Platform {
		out[k] = v
	}
	names := make([]string, 0, len(out))
	for k := range out {
		names = append(names, k)
	}
	sort.Strings(names)
	p := &repb.Platform{}
	for _, k := range names {
		p.Properties = append(p.Properties, &repb.Platform_Property{Name: k, Value: out[k]})
	}
	rc := proto.Clone(cmd).(*repb.Command)
	rc.Platform = p
	if len(rc.OutputPaths) > 0 {
		rc.OutputFiles, rc.OutputDirectories = nil, nil
	}
	ra := proto.Clone(action).(*repb.Action)
	ra.Platform = proto.Clone(p).(*repb.Platform)
	if ra.Timeout == nil || ra.Timeout.AsDuration() <= 0 {
		ra.Timeout = durationpb.New(g.cfg.ActionTimeout)
	}
	return ra, rc
}

func marshal(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic(err) // cannot fail for these messages
	}
	return b
}

// run forwards one action and completes its operation.
func (g *Remote) run(ctx context.Context, o *op, st blobstore.Stores, ad digest.Digest, action *repb.Action, cmd *repb.Command, req *repb.ExecuteRequest, what string) {
	defer o.cancel()
	defer g.ops.done(o)
	resp, err := g.forward(ctx, o, st, ad, action, cmd, req)
	if err != nil && ctx.Err() != nil {
		// CancelOperation, or the gateway stopping.
		g.log.Info("gateway: operation cancelled", "target", what, "action", ad.Sprint())
		o.finish(nil, status.Errorf(codes.Canceled, "%s: the operation was cancelled", what))
		return
	}
	if err != nil {
		g.failed.Add(1)
		g.log.Warn("gateway: remote execution failed", "target", what, "action", ad.Sprint(), "err", err)
		code := status.Code(err)
		if code == codes.Unknown {
			code = codes.Unavailable
		}
		err = status.Errorf(code, "%s: remote execution backend %s: %s", what, g.cfg.Address, status.Convert(err).Message())
	}
	o.finish(resp, err)
}

func (g *Remote) forward(ctx context.Context, o *op, st blobstore.Stores, ad digest.Digest, action *repb.Action, cmd *repb.Command, req *repb.ExecuteRequest) (*repb.ExecuteResponse, error) {
	t0 := time.Now()
	select {
	case g.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	defer func() { <-g.sem }()
	observe("queue", &t0)
	g.forwarded.Add(1)
	ra, rc := g.rewrite(action, cmd)
	cmdData := marshal(rc)
	ra.CommandDigest = digest.Compute(ad.Function(), cmdData).Proto()
	actData := marshal(ra)
	rad := digest.Compute(ad.Function(), actData)
	root, err := digest.FromProto(ad.Function(), action.InputRootDigest)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "input root digest: %v", err)
	}
	extra := []blobstore.Blob{{Digest: rad, Data: actData}, {Digest: digest.Compute(ad.Function(), cmdData), Data: cmdData}}
	var resp *repb.ExecuteResponse
	for attempt := 0; ; attempt++ {
		if err := g.upload(ctx, st.CAS, root, extra, attempt > 0); err != nil {
			return nil, fmt.Errorf("uploading the inputs: %w", err)
		}
		observe("upload", &t0)
		resp, err = g.execute(ctx, o, rad, req, ra.Timeout.AsDuration())
		observe("execute", &t0)
		if attempt == 0 && isMissing(err, resp) {
			// The remote evicted blobs the gateway took for present.
			g.log.Info("gateway: the remote lacks inputs; uploading them again", "action", ad.Sprint())
			continue
		}
		if err != nil {
			return nil, err
		}
		break
	}
	if err := g.fetchResult(ctx, st.CAS, resp, platformOf(action, cmd)[translate.PropPTY] == "true"); err != nil {
		return nil, fmt.Errorf("copying the result: %w", err)
	}
	if res := resp.Result; resp.GetStatus().GetCode() == int32(codes.OK) && res.GetExitCode() == 0 && !action.DoNotCache {
		stored := proto.Clone(res).(*repb.ActionResult)
		stored.StdoutRaw, stored.StderrRaw = nil, nil
		for _, f := range stored.OutputFiles {
			f.Contents = nil
		}
		if err := grpcservers.PutActionResult(ctx, st, ad, stored); err != nil {
			g.log.Warn("gateway: storing the action result", "action", ad.Sprint(), "err", err)
		}
	}
	observe("fetch", &t0)
	return resp, nil
}

// isMissing reports whether the remote failed the action for missing
// inputs (FAILED_PRECONDITION with a MISSING violation).
func isMissing(err error, resp *repb.ExecuteResponse) bool {
	var st *status.Status
	switch {
	case err != nil:
		st = status.Convert(err)
	case resp.GetStatus().GetCode() != 0:
		st = status.FromProto(resp.GetStatus())
	default:
		return false
	}
	if st.Code() != codes.FailedPrecondition {
		return false
	}
	for _, d := range st.Details() {
		if pf, ok := d.(*errdetails.PreconditionFailure); ok {
			for _, v := range pf.Violations {
				if v.Type == "MISSING" {
					return true
				}
			}
		}
	}
	return false
}

// execute runs the action on the remote and returns its response: an
// Execute stream, resumed with WaitExecution by the remote's operation
// name when it drops or fails with UNAVAILABLE (with backoff), and
// submitted again if the remote forgot the operation. Each stream's
// deadline is the action's timeout plus StreamSlack; a stream that
// outlives it is resumed.
func (g *Remote) execute(ctx context.Context, o *op, rad digest.Digest, req *repb.ExecuteRequest, timeout time.Duration) (*repb.ExecuteResponse, error) {
	ereq := &repb.ExecuteRequest{
		InstanceName:    g.cfg.Instance,
		ActionDigest:    rad.Proto(),
		DigestFunction:  rad.Function().Proto(),
		SkipCacheLookup: req.SkipCacheLookup,
		ExecutionPolicy: req.ExecutionPolicy,
		// Inlined streams are not needed: the gateway copies blobs.
	}
	var name string
	delay := g.cfg.RetryDelay
	failures := 0
	for {
		sctx, cancel := context.WithTimeout(ctx, timeout+g.cfg.StreamSlack)
		var stream grpc.ServerStreamingClient[longrunningpb.Operation]
		var err error
		if name == "" {
			stream, err = g.rexec.Execute(sctx, ereq)
		} else {
			stream, err = g.rexec.WaitExecution(sctx, &repb.WaitExecutionRequest{Name: name})
		}
		progressed := false
		for err == nil {
			var lop *longrunningpb.Operation
			if lop, err = stream.Recv(); err != nil {
				break
			}
			progressed = true
			if lop.GetName() != "" {
				name = lop.GetName()
				o.setRemote(name)
			}
			var md repb.ExecuteOperationMetadata
			if lop.GetMetadata().UnmarshalTo(&md) == nil && md.Stage == repb.ExecutionStage_EXECUTING {
				o.setStage(repb.ExecutionStage_EXECUTING)
			}
			if !lop.GetDone() {
				continue
			}
			cancel()
			if e := lop.GetError(); e != nil {
				return nil, status.ErrorProto(e)
			}
			resp := &repb.ExecuteResponse{}
			if err := lop.GetResponse().UnmarshalTo(resp); err != nil {
				return nil, status.Errorf(codes.Internal, "operation %s: bad response: %v", name, err)
			}
			if resp.Result == nil {
				resp.Result = &repb.ActionResult{}
			}
			return resp, nil
		}
		cancel()
		if ctx.Err() != nil {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		code := status.Code(err)
		retriable := errors.Is(err, io.EOF) || code == codes.Unavailable || code == codes.DeadlineExceeded || code == codes.Aborted
		if code == codes.NotFound && name != "" {
			name, retriable = "", true // the remote forgot it: submit again
		}
		if progressed {
			failures, delay = 0, g.cfg.RetryDelay
		}
		failures++
		if !retriable || failures >= g.cfg.MaxAttempts {
			if errors.Is(err, io.EOF) {
				err = status.Error(codes.Unavailable, "the operation stream ended before the operation completed")
			}
			return nil, err
		}
		g.log.Debug("gateway: remote execution interrupted; resuming", "op", name, "err", err)
		if !sleep(ctx, jitter(delay)) {
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		delay = min(2*delay, 5*time.Second)
	}
}

func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d)/2+1))
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// fetchResult copies the blobs of the result into the gateway's CAS. With
// pty (the action asked for Nix's merged log, which a stock worker cannot
// give) stdout and stderr are joined into one log as stdout, stdout first.
func (g *Remote) fetchResult(ctx context.Context, cas blobstore.BlobAccess, resp *repb.ExecuteResponse, pty bool) error {
	res := resp.Result
	fn := g.cfg.DigestFunction
	var ds []digest.Digest
	add := func(pd *repb.Digest) error {
		if pd == nil {
			return nil
		}
		d, err := digest.FromProto(fn, pd)
		if err != nil {
			return err
		}
		ds = append(ds, d)
		return nil
	}
	for _, f := range res.OutputFiles {
		if err := add(f.Digest); err != nil {
			return fmt.Errorf("output %s: %w", f.Path, err)
		}
	}
	for _, od := range res.OutputDirectories {
		more, err := g.treeBlobs(ctx, od)
		if err != nil {
			return fmt.Errorf("output %s: %w", od.Path, err)
		}
		ds = append(ds, more...)
	}
	if err := add(res.StdoutDigest); err != nil {
		return fmt.Errorf("stdout: %w", err)
	}
	if err := add(res.StderrDigest); err != nil {
		return fmt.Errorf("stderr: %w", err)
	}
	if err := copyBlobs(ctx, g.rcas, cas, ds); err != nil {
		return err
	}
	// A server that inlines a stream without its digest: store it.
	for _, s := range []struct {
		raw []byte
		d   **repb.Digest
	}{{res.StdoutRaw, &res.StdoutDigest}, {res.StderrRaw, &res.StderrDigest}} {
		if *s.d == nil && len(s.raw) > 0 {
			d := digest.Compute(fn, s.raw)
			if err := blobstore.PutBytes(ctx, cas, d, s.raw); err != nil {
				return fmt.Errorf("inlined stream: %w", err)
			}
			*s.d = d.Proto()
		}
	}
	if pty {
		return mergeLog(ctx, cas, fn, res)
	}
	return nil
}

// maxMergedLog bounds the logs mergeLog joins.
const maxMergedLog = 16 << 20

// mergeLog makes stdout the concatenation of stdout and stderr.
func mergeLog(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, res *repb.ActionResult) error {
	so, _ := digest.FromProto(fn, res.StdoutDigest)
	se, _ := digest.FromProto(fn, res.StderrDigest)
	if se.IsZero() || se.Size() == 0 || so.Size()+se.Size() > maxMergedLog {
		return nil
	}
	var buf bytes.Buffer
	for _, d := range []digest.Digest{so, se} {
		if d.IsZero() || d.Size() == 0 {
			continue
		}
		b, err := blobstore.GetBytes(ctx, cas, d, maxMergedLog)
		if err != nil {
			return fmt.Errorf("log %s: %w", d, err)
		}
		buf.Write(b)
	}
	d := digest.Compute(fn, buf.Bytes())
	if err := blobstore.PutBytes(ctx, cas, d, buf.Bytes()); err != nil {
		return fmt.Errorf("log: %w", err)
	}
	res.StdoutDigest, res.StderrDigest = d.Proto(), digest.Empty(fn).Proto()
	res.StdoutRaw, res.StderrRaw = nil, nil
	return nil
}
