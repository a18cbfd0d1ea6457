package gateway

import (
	"context"
	"sort"
	"sync"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	"tvixfarm/cas/digest"
)

// op is one operation of the gateway: an action forwarded to the remote.
// Its clients follow it by name; it runs on whether they stay or not.
type op struct {
	name   string
	key    string // instance, digest function and action digest
	action digest.Digest
	cancel context.CancelFunc

	mu      sync.Mutex
	stage   repb.ExecutionStage_Value
	resp    *repb.ExecuteResponse // set when done
	err     error                 // set when done without a response
	changed chan struct{}         // closed and replaced on every change
	remote  string                // the remote's operation name, once known
	deleted bool                  // DeleteOperation while running
}

func newOp(name, key string, ad digest.Digest, cancel context.CancelFunc) *op {
	return &op{name: name, key: key, action: ad, cancel: cancel, stage: repb.ExecutionStage_QUEUED, changed: make(chan struct{})}
}

// setStage moves the operation forward to stage (never back).
func (o *op) setStage(s repb.ExecutionStage_Value) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.resp != nil || o.err != nil || s <= o.stage {
		return
	}
	o.stage = s
	close(o.changed)
	o.changed = make(chan struct{})
}

func (o *op) setRemote(name string) {
	o.mu.Lock()
	o.remote = name
	o.mu.Unlock()
}

// finish completes the operation with a response or an error.
func (o *op) finish(resp *repb.ExecuteResponse, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stage = repb.ExecutionStage_COMPLETED
	o.resp, o.err = resp, err
	close(o.changed)
	o.changed = make(chan struct{})
}

// snapshot returns the operation as clients see it, and a channel closed
// at its next change.
func (o *op) snapshot() (*longrunningpb.Operation, <-chan struct{}) {
	o.mu.Lock()
	defer o.mu.Unlock()
	md := &repb.ExecuteOperationMetadata{Stage: o.stage, ActionDigest: o.action.Proto(), DigestFunction: o.action.Function().Proto()}
	lop := &longrunningpb.Operation{Name: o.name}
	lop.Metadata, _ = anypb.New(md)
	switch {
	case o.resp != nil:
		lop.Done = true
		r, _ := anypb.New(o.resp)
		lop.Result = &longrunningpb.Operation_Response{Response: r}
	case o.err != nil:
		lop.Done = true
		lop.Result = &longrunningpb.Operation_Error{Error: status.Convert(o.err).Proto()}
	}
	return lop, o.changed
}

// ops is the gateway's table of operations, by name, and of the running
// ones by action, so that a second Execute of a running action joins it.
type ops struct {
	mu       sync.Mutex
	byName   map[string]*op
	byAction map[string]*op
	retain   time.Duration
}

func newOps(retain time.Duration) *ops {
	return &ops{byName: map[string]*op{}, byAction: map[string]*op{}, retain: retain}
}

// join returns the running operation of key, or adds the one start makes.
func (t *ops) join(key string, start func() *op) (o *op, joined bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if o := t.byAction[key]; o != nil {
		o.mu.Lock()
		o.deleted = false
		o.mu.Unlock()
		return o, true
	}
	o = start()
	t.byName[o.name] = o
	t.byAction[key] = o
	return o, false
}

// done forgets o as running, and forgets it entirely after the retention
// time (at once if it was deleted).
func (t *ops) done(o *op) {
	t.mu.Lock()
	if t.byAction[o.key] == o {
		delete(t.byAction, o.key)
	}
	o.mu.Lock()
	deleted := o.deleted
	o.mu.Unlock()
	t.mu.Unlock()
	if deleted {
		t.remove(o.name)
		return
	}
	time.AfterFunc(t.retain, func() { t.remove(o.name) })
}

func (t *ops) remove(name string) {
	t.mu.Lock()
	delete(t.byName, name)
	t.mu.Unlock()
}

func (t *ops) get(name string) (*op, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	o, ok := t.byName[name]
	return o, ok
}

// counts returns how many operations are queued and executing.
func (t *ops) counts() (queued, executing int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, o := range t.byAction {
		o.mu.Lock()
		if o.stage == repb.ExecutionStage_EXECUTING {
			executing++
		} else {
			queued++
		}
		o.mu.Unlock()
	}
	return queued, executing
}

func notFound(name string) error {
	return status.Errorf(codes.NotFound, "operation %q not found", name)
}

// GetOperation returns an operation's state.
func (g *Remote) GetOperation(ctx context.Context, req *longrunningpb.GetOperationRequest) (*longrunningpb.Operation, error) {
	o, ok := g.ops.get(req.Name)
	if !ok {
		return nil, notFound(req.Name)
	}
	lop, _ := o.snapshot()
	return lop, nil
}

// ListOperations lists the operations the gateway knows, by name. The
// filter "stage=queued|executing|completed" is understood; pages are not.
func (g *Remote) ListOperations(ctx context.Context, req *longrunningpb.ListOperationsRequest) (*longrunningpb.ListOperationsResponse, error) {
	want := repb.ExecutionStage_UNKNOWN
	switch req.Filter {
	case "":
	case "stage=queued":
		want = repb.ExecutionStage_QUEUED
	case "stage=executing":
		want = repb.ExecutionStage_EXECUTING
	case "stage=completed":
		want = repb.ExecutionStage_COMPLETED
	default:
		return nil, status.Errorf(codes.InvalidArgument, "filter %q: want stage=queued, stage=executing or stage=completed", req.Filter)
	}
	g.ops.mu.Lock()
	all := make([]*op, 0, len(g.ops.byName))
	for _, o := range g.ops.byName {
		all = append(all, o)
	}
	g.ops.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].name < all[j].name })
	resp := &longrunningpb.ListOperationsResponse{}
	for _, o := range all {
		o.mu.Lock()
		st := o.stage
		o.mu.Unlock()
		if want != repb.ExecutionStage_UNKNOWN && st != want {
			continue
		}
		lop, _ := o.snapshot()
		resp.Operations = append(resp.Operations, lop)
	}
	return resp, nil
}

// CancelOperation cancels a running operation here and on the remote.
func (g *Remote) CancelOperation(ctx context.Context, req *longrunningpb.CancelOperationRequest) (*emptypb.Empty, error) {
	o, ok := g.ops.get(req.Name)
	if !ok {
		return nil, notFound(req.Name)
	}
	o.mu.Lock()
	remote := o.remote
	done := o.resp != nil || o.err != nil
	o.mu.Unlock()
	if done {
		return &emptypb.Empty{}, nil
	}
	if remote != "" {
		cctx, cancel := context.WithTimeout(ctx, g.cfg.RPCTimeout)
		if _, err := g.rops.CancelOperation(cctx, &longrunningpb.CancelOperationRequest{Name: remote}); err != nil {
			g.log.Debug("gateway: remote CancelOperation", "op", remote, "err", err)
		}
		cancel()
	}
	o.cancel()
	return &emptypb.Empty{}, nil
}

// DeleteOperation forgets a completed operation at once, a running one
// when it completes; it never cancels.
func (g *Remote) DeleteOperation(ctx context.Context, req *longrunningpb.DeleteOperationRequest) (*emptypb.Empty, error) {
	o, ok := g.ops.get(req.Name)
	if !ok {
		return nil, notFound(req.Name)
	}
	o.mu.Lock()
	done := o.resp != nil || o.err != nil
	o.deleted = true
	o.mu.Unlock()
	if done {
		g.ops.remove(req.Name)
	}
	return &emptypb.Empty{}, nil
}

// WaitOperation waits until the operation completes, the request's
// timeout passes or the client goes away, and returns its state.
func (g *Remote) WaitOperation(ctx context.Context, req *longrunningpb.WaitOperationRequest) (*longrunningpb.Operation, error) {
	o, ok := g.ops.get(req.Name)
	if !ok {
		return nil, notFound(req.Name)
	}
	if t := req.GetTimeout(); t != nil && t.AsDuration() > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t.AsDuration())
		defer cancel()
	}
	for {
		lop, ch := o.snapshot()
		if lop.Done {
			return lop, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return lop, nil
		}
	}
}
