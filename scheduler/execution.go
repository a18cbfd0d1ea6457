package scheduler

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/google/uuid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	"tvixfarm/scheduler/state"
)

// opPrefix starts every operation name.
const opPrefix = "operations/"

// ExecutionConfig configures the client-facing services.
type ExecutionConfig struct {
	// CancelOnDisconnect cancels an operation when every client that
	// waited for it has gone (default false: the action runs to the
	// end, and its result is cached).
	CancelOnDisconnect bool
	// PlatformGrace is how long after this node became leader an action
	// that no registered worker could run waits for workers to connect
	// before it fails (default 30 s).
	PlatformGrace time.Duration
	// ReadTimeout bounds the CAS and AC reads of one Execute (default
	// 30 s).
	ReadTimeout time.Duration
	Logger      *slog.Logger
}

// Execution serves REAPI Execution and google.longrunning Operations on a
// Node. On a follower its calls are forwarded to the leader (see
// Forwarder), so every method runs on the leader.
type Execution struct {
	repb.UnimplementedExecutionServer
	longrunningpb.UnimplementedOperationsServer

	n      *Node
	stores *blobstore.Instances
	cfg    ExecutionConfig
	log    *slog.Logger
	ws     *Workers
	reader *casReader
}

// NewExecution returns the services for node n, reading actions and
// results from stores. ws provides the leadership start time for the
// platform grace period.
func NewExecution(n *Node, stores *blobstore.Instances, ws *Workers, cfg ExecutionConfig) *Execution {
	if cfg.PlatformGrace <= 0 {
		cfg.PlatformGrace = 30 * time.Second
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = 30 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	e := &Execution{n: n, stores: stores, cfg: cfg, log: log, ws: ws, reader: newCASReader(n.ctx, cfg.ReadTimeout)}
	n.setAdmission(e.admit)
	return e
}

// Execute runs an action, or answers from the action cache.
func (e *Execution) Execute(req *repb.ExecuteRequest, stream grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	ctx := stream.Context()
	fn, err := grpcservers.RequestFunction(req.InstanceName, req.DigestFunction)
	if err != nil {
		return err
	}
	ad, err := digest.FromProto(fn, req.ActionDigest)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "action digest: %v", err)
	}
	st := e.stores.For(req.InstanceName)
	rctx, cancel := context.WithTimeout(ctx, e.cfg.ReadTimeout)
	defer cancel()
	if !req.SkipCacheLookup {
		res, err := grpcservers.GetActionResult(rctx, st, ad)
		if err == nil {
			name := opPrefix + "cached-" + uuid.NewString()
			return stream.Send(operation(name, ad, schedulerpb.Stage_STAGE_COMPLETED,
				&repb.ExecuteResponse{Result: res, CachedResult: true, Status: status.New(codes.OK, "").Proto()}))
		}
		if !blobstore.IsNotFound(err) {
			e.log.Warn("scheduler: action cache lookup failed; executing", "action", ad.Sprint(), "err", err)
		}
	}
	action, platform, err := e.platform(rctx, st.CAS, ad)
	if err != nil {
		return err
	}
	md := requestMetadata(ctx)
	waiter := "exec/" + uuid.NewString()
	var prio int32
	if p := req.ExecutionPolicy; p != nil {
		prio = p.Priority
	}
	sub := &schedulerpb.Submit{
		Operation:          opPrefix + uuid.NewString(),
		InstanceName:       req.InstanceName,
		DigestFunction:     int32(fn.Proto()),
		ActionDigest:       &schedulerpb.Digest{Hash: ad.Hex(), SizeBytes: ad.Size()},
		Platform:           platform,
		Priority:           prio,
		InvocationId:       md.GetToolInvocationId(),
		Waiter:             waiter,
		CancelOnDisconnect: e.cfg.CancelOnDisconnect,
		TimeUnixNano:       time.Now().UnixNano(),
		DoNotCache:         action.DoNotCache,
	}
	cmd := &schedulerpb.Command{Command: &schedulerpb.Command_Submit{Submit: sub}}
	if e.n.IsLeader() {
		// On a follower, the leader checks forwarded Submits.
		if err := e.admit(cmd); err != nil {
			return err
		}
	}
	res, index, err := e.n.apply(ctx, []*schedulerpb.Command{cmd})
	if err != nil {
		return err
	}
	if res[0].Err != nil {
		return res[0].Err
	}
	// The operation is in the log: tell the client its name at once,
	// before this node's state (on a follower) shows it.
	stage := schedulerpb.Stage_STAGE_QUEUED
	if res[0].Executing {
		stage = schedulerpb.Stage_STAGE_EXECUTING
	}
	if err := stream.Send(operation(res[0].Operation, ad, stage, nil)); err != nil {
		e.detach(waiter, res[0].Operation)
		return err
	}
	return e.follow(ctx, stream, res[0].Operation, waiter, index, stage)
}

// admit fails a Submit of an action that no registered worker could run,
// once the workers have had time to connect to this leader. It runs on
// the leader, for its own Executes and for those followers forward.
func (e *Execution) admit(c *schedulerpb.Command) error {
	sub := c.GetSubmit()
	if sub == nil {
		return nil
	}
	var unsat string
	e.n.Read(func(s *state.State) {
		if k, v, ok := s.Unsatisfiable(sub.Platform); ok {
			unsat = describeUnsat(k, v)
		}
	})
	if unsat != "" && e.ws.settled(e.cfg.PlatformGrace) {
		return status.Errorf(codes.FailedPrecondition, "action %s/%d: no worker can run it: %s", sub.GetActionDigest().GetHash(), sub.GetActionDigest().GetSizeBytes(), unsat)
	}
	return nil
}

// WaitExecution follows an operation until it completes.
func (e *Execution) WaitExecution(req *repb.WaitExecutionRequest, stream grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	ctx := stream.Context()
	waiter := "wait/" + uuid.NewString()
	res, index, err := e.n.apply(ctx, []*schedulerpb.Command{{Command: &schedulerpb.Command_Attach{Attach: &schedulerpb.Attach{
		Operation: req.Name, Waiter: waiter, TimeUnixNano: time.Now().UnixNano()}}}})
	if err != nil {
		return err
	}
	if res[0].Err != nil && !res[0].Stale {
		return res[0].Err
	}
	if res[0].Err != nil || res[0].Stale {
		waiter = "" // completed: nothing to detach
	}
	return e.follow(ctx, stream, req.Name, waiter, index, schedulerpb.Stage_STAGE_UNSPECIFIED)
}

// follow streams the operation's stages from this node's state until it
// completes, once the state has applied the log entry at index; the
// client has already been sent stage sent. When the client goes away
// first, its waiter is detached (which cancels the operation if it asked
// for that and nobody else waits). When this node loses touch with the
// cluster, the stream ends with UNAVAILABLE: the client resumes with
// WaitExecution on another node.
func (e *Execution) follow(ctx context.Context, stream grpc.ServerStreamingServer[longrunningpb.Operation], name, waiter string, index uint64, sent schedulerpb.Stage) error {
	w := e.n.Watch(name)
	defer w.Stop()
	lost := e.n.ContactLost()
	if err := e.n.waitApplied(ctx, index); err != nil {
		if ctx.Err() != nil {
			e.detach(waiter, name)
			return status.FromContextError(ctx.Err()).Err()
		}
		return err
	}
	last := sent
	// Streams are resent every so often so proxies keep them open and
	// clients see the operation is alive.
	keepalive := time.NewTicker(30 * time.Second)
	defer keepalive.Stop()
	for {
		var stage schedulerpb.Stage
		var ok bool
		e.n.Read(func(s *state.State) { stage, ok = s.Stage(name) })
		if !ok || stage == schedulerpb.Stage_STAGE_COMPLETED || stage != last {
			op, opStage, ok := e.watchedStage(w)
			if !ok {
				return status.Errorf(codes.NotFound, "operation %q not found", name)
			}
			if err := stream.Send(op); err != nil {
				e.detach(waiter, name)
				return err
			}
			if op.Done {
				return nil
			}
			last = opStage
		}
		select {
		case <-w.C:
		case <-keepalive.C:
			last = schedulerpb.Stage_STAGE_UNSPECIFIED
		case <-lost:
			return status.Errorf(codes.Unavailable, "scheduler: %s lost touch with the cluster's leader; resume with WaitExecution", e.n.ID())
		case <-ctx.Done():
			e.detach(waiter, name)
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

// watched returns the operation w watches: from the state, or as it
// completed if it was deleted and removed then.
func (e *Execution) watched(w *Watch) (*longrunningpb.Operation, bool) {
	op, _, ok := e.watchedStage(w)
	return op, ok
}

// watchedStage is watched, with the operation's stage.
func (e *Execution) watchedStage(w *Watch) (*longrunningpb.Operation, schedulerpb.Stage, bool) {
	var op *schedulerpb.Operation
	var ok bool
	e.n.Read(func(s *state.State) { op, ok = s.Operation(w.op) })
	if !ok {
		if op = w.Final(); op == nil {
			return nil, 0, false
		}
	}
	return toOperation(op), op.Stage, true
}

func (e *Execution) detach(waiter, name string) {
	if waiter == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.n.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_Detach{Detach: &schedulerpb.Detach{
		Operation: name, Waiter: waiter, TimeUnixNano: time.Now().UnixNano()}}}); err != nil {
		e.log.Debug("scheduler: detach failed", "op", name, "err", err)
	}
}

// get returns the operation as a longrunning.Operation.
func (e *Execution) get(name string) (*longrunningpb.Operation, bool) {
	var op *schedulerpb.Operation
	var ok bool
	e.n.Read(func(s *state.State) { op, ok = s.Operation(name) })
	if !ok {
		return nil, false
	}
	return toOperation(op), true
}

// platform reads the platform of action ad: the Action's (REAPI ≥ 2.2),
// else its Command's.
func (e *Execution) platform(ctx context.Context, cas blobstore.BlobAccess, ad digest.Digest) (*repb.Action, []*schedulerpb.Property, error) {
	action := &repb.Action{}
	if err := e.getProto(ctx, cas, ad, action); err != nil {
		return nil, nil, err
	}
	p := action.Platform
	if len(p.GetProperties()) == 0 {
		cd, err := digest.FromProto(ad.Function(), action.CommandDigest)
		if err != nil {
			return nil, nil, status.Errorf(codes.InvalidArgument, "action %s: command digest: %v", ad.Sprint(), err)
		}
		var cmd repb.Command
		if err := e.getProto(ctx, cas, cd, &cmd); err != nil {
			return nil, nil, err
		}
		p = cmd.Platform
	}
	props := make([]*schedulerpb.Property, len(p.GetProperties()))
	for i, pp := range p.GetProperties() {
		props[i] = &schedulerpb.Property{Name: pp.Name, Value: pp.Value}
	}
	return action, props, nil
}

// getProto reads and decodes message d; a missing one is the
// FAILED_PRECONDITION with a MISSING violation REAPI prescribes.
func (e *Execution) getProto(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest, m proto.Message) error {
	data, err := e.reader.get(ctx, cas, d)
	if blobstore.IsNotFound(err) {
		return missing(d)
	}
	if err != nil {
		return status.Errorf(codes.Unavailable, "read %s: %v", d.Sprint(), err)
	}
	if err := proto.Unmarshal(data, m); err != nil {
		return status.Errorf(codes.InvalidArgument, "%s is not a %s: %v", d.Sprint(), m.ProtoReflect().Descriptor().Name(), err)
	}
	return nil
}

// GetOperation returns an operation.
func (e *Execution) GetOperation(ctx context.Context, req *longrunningpb.GetOperationRequest) (*longrunningpb.Operation, error) {
	op, ok := e.get(req.Name)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "operation %q not found", req.Name)
	}
	return op, nil
}

// ListOperations lists operations; the filter may be "stage=queued",
// "stage=executing" or "stage=completed". Pages are by page_size with
// the next page's offset as token.
func (e *Execution) ListOperations(ctx context.Context, req *longrunningpb.ListOperationsRequest) (*longrunningpb.ListOperationsResponse, error) {
	stage := schedulerpb.Stage_STAGE_UNSPECIFIED
	if f := strings.TrimSpace(req.Filter); f != "" {
		v, ok := strings.CutPrefix(f, "stage=")
		s, known := stages[v]
		if !ok || !known {
			return nil, status.Errorf(codes.InvalidArgument, "filter %q: want stage=queued|executing|completed", f)
		}
		stage = s
	}
	var ops []*schedulerpb.Operation
	e.n.Read(func(s *state.State) { ops = s.Operations(stage) })
	start := 0
	if req.PageToken != "" {
		if _, err := fmt.Sscan(req.PageToken, &start); err != nil || start < 0 || start > len(ops) {
			return nil, status.Errorf(codes.InvalidArgument, "invalid page token %q", req.PageToken)
		}
	}
	end := len(ops)
	if req.PageSize > 0 && start+int(req.PageSize) < end {
		end = start + int(req.PageSize)
	}
	resp := &longrunningpb.ListOperationsResponse{}
	for _, op := range ops[start:end] {
		resp.Operations = append(resp.Operations, toOperation(op))
	}
	if end < len(ops) {
		resp.NextPageToken = fmt.Sprint(end)
	}
	return resp, nil
}

var stages = map[string]schedulerpb.Stage{
	"queued":    schedulerpb.Stage_STAGE_QUEUED,
	"executing": schedulerpb.Stage_STAGE_EXECUTING,
	"completed": schedulerpb.Stage_STAGE_COMPLETED,
}

// CancelOperation cancels a queued or executing operation; its worker
// kills the sandbox.
func (e *Execution) CancelOperation(ctx context.Context, req *longrunningpb.CancelOperationRequest) (*emptypb.Empty, error) {
	res, err := e.n.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_Cancel{Cancel: &schedulerpb.Cancel{
		Operation: req.Name, TimeUnixNano: time.Now().UnixNano()}}})
	if err != nil {
		return nil, err
	}
	if res[0].Err != nil {
		return nil, res[0].Err
	}
	return &emptypb.Empty{}, nil
}

// WaitOperation waits until the operation completes or the timeout (at
// most a minute) passes, and returns it.
func (e *Execution) WaitOperation(ctx context.Context, req *longrunningpb.WaitOperationRequest) (*longrunningpb.Operation, error) {
	timeout := time.Minute
	if t := req.Timeout; t != nil && t.AsDuration() > 0 && t.AsDuration() < timeout {
		timeout = t.AsDuration()
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	w := e.n.Watch(req.Name)
	defer w.Stop()
	lost := e.n.LeadershipLost()
	for {
		op, ok := e.watched(w)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "operation %q not found", req.Name)
		}
		if op.Done {
			return op, nil
		}
		select {
		case <-w.C:
		case <-lost:
			return nil, status.Errorf(codes.Unavailable, "scheduler: %s is no longer the leader; retry", e.n.ID())
		case <-ctx.Done():
			return op, nil
		}
	}
}

// DeleteOperation says the client is no longer interested in an
// operation; it does not cancel it (CancelOperation does). A completed
// operation is removed at once, so GetOperation answers NOT_FOUND. A
// queued or executing one runs on, its result is cached as usual, and
// it is removed as soon as it completes; streams that follow it
// (Execute, WaitExecution) still receive the result. Until then it is
// listed and answered as before, and an Execute of the same action or a
// WaitExecution of it undoes the delete. Unknown names are NOT_FOUND.
func (e *Execution) DeleteOperation(ctx context.Context, req *longrunningpb.DeleteOperationRequest) (*emptypb.Empty, error) {
	res, err := e.n.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_Delete{Delete: &schedulerpb.Delete{
		Operation: req.Name, TimeUnixNano: time.Now().UnixNano()}}})
	if err != nil {
		return nil, err
	}
	if res[0].Err != nil {
		return nil, res[0].Err
	}
	return &emptypb.Empty{}, nil
}

// toOperation renders an operation for REAPI clients.
func toOperation(op *schedulerpb.Operation) *longrunningpb.Operation {
	fn, _ := digest.FunctionFromProto(repb.DigestFunction_Value(op.DigestFunction))
	ad, _ := digest.Parse(fn, op.ActionDigest.GetHash(), op.ActionDigest.GetSizeBytes())
	if op.Stage == schedulerpb.Stage_STAGE_COMPLETED && hasStatus(op.Result) {
		// Passed on as it is: nothing to fill in, no decoding and encoding.
		lop := operation(op.Name, ad, op.Stage, nil)
		lop.Done = true
		lop.Result = &longrunningpb.Operation_Response{Response: &anypb.Any{TypeUrl: executeResponseURL, Value: op.Result}}
		return lop
	}
	var resp *repb.ExecuteResponse
	if op.Stage == schedulerpb.Stage_STAGE_COMPLETED {
		resp = &repb.ExecuteResponse{}
		if len(op.Result) > 0 {
			if err := proto.Unmarshal(op.Result, resp); err != nil {
				resp = &repb.ExecuteResponse{Status: status.Newf(codes.Internal, "unreadable result: %v", err).Proto()}
			}
		} else {
			resp.Status = &statuspb.Status{Code: op.GetStatus().GetCode(), Message: op.GetStatus().GetMessage()}
		}
		if resp.Status == nil {
			resp.Status = status.New(codes.OK, "").Proto()
		}
	}
	return operation(op.Name, ad, op.Stage, resp)
}

// executeResponseURL is the type URL of an ExecuteResponse in an Any.
var executeResponseURL = "type.googleapis.com/" + string((&repb.ExecuteResponse{}).ProtoReflect().Descriptor().FullName())

// hasStatus reports whether b, an encoded ExecuteResponse, is well formed
// at its top level and has its status field (3).
func hasStatus(b []byte) bool {
	found := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return false
		}
		b = b[n:]
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return false
		}
		if num == 3 && typ == protowire.BytesType {
			found = true
		}
		b = b[m:]
	}
	return found
}

// operation builds a longrunning.Operation with REAPI metadata.
func operation(name string, ad digest.Digest, stage schedulerpb.Stage, resp *repb.ExecuteResponse) *longrunningpb.Operation {
	md := &repb.ExecuteOperationMetadata{ActionDigest: ad.Proto(), DigestFunction: ad.Function().Proto()}
	switch stage {
	case schedulerpb.Stage_STAGE_QUEUED:
		md.Stage = repb.ExecutionStage_QUEUED
	case schedulerpb.Stage_STAGE_EXECUTING:
		md.Stage = repb.ExecutionStage_EXECUTING
	case schedulerpb.Stage_STAGE_COMPLETED:
		md.Stage = repb.ExecutionStage_COMPLETED
	}
	op := &longrunningpb.Operation{Name: name}
	op.Metadata, _ = anypb.New(md)
	if resp != nil {
		op.Done = true
		r, _ := anypb.New(resp)
		op.Result = &longrunningpb.Operation_Response{Response: r}
	}
	return op
}

// requestMetadata returns the REAPI RequestMetadata header, if any.
func requestMetadata(ctx context.Context) *repb.RequestMetadata {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("build.bazel.remote.execution.v2.requestmetadata-bin") {
		var rm repb.RequestMetadata
		if proto.Unmarshal([]byte(v), &rm) == nil {
			return &rm
		}
	}
	return nil
}

// describeUnsat words an unsatisfiable platform requirement.
func describeUnsat(key, value string) string {
	if key == "" {
		return value
	}
	return fmt.Sprintf("no worker offers %s=%s", key, value)
}

// missing is the FAILED_PRECONDITION error REAPI prescribes for a blob the
// CAS lacks.
func missing(d digest.Digest) error {
	st := status.Newf(codes.FailedPrecondition, "%s is not in the CAS", d.Sprint())
	if ds, err := st.WithDetails(&errdetails.PreconditionFailure{Violations: []*errdetails.PreconditionFailure_Violation{
		{Type: "MISSING", Subject: "blobs/" + d.String()}}}); err == nil {
		st = ds
	}
	return st.Err()
}
