package scheduler_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"tvixfarm/executor"
)

// gated runs one action at a time, each when the test releases it.
type gated struct {
	release   chan struct{}
	started   chan string // action hashes
	cancelled atomic.Int32
}

func (g *gated) Execute(ctx context.Context, req *executor.Request) (*repb.ExecuteResponse, error) {
	g.started <- req.Action.Hex()
	select {
	case <-g.release:
		return &repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 0}}, nil
	case <-ctx.Done():
		g.cancelled.Add(1)
		return nil, ctx.Err()
	}
}

func (g *gated) Platform() *repb.Platform { return (&runner{}).Platform() }
func (g *gated) Slots() int               { return 1 }

// TestDeleteOperation: DeleteOperation removes a completed operation from
// every replica; a queued or executing one is not cancelled, completes,
// gives its result to the streams that follow it, and is removed then.
func TestDeleteOperation(t *testing.T) {
	c := newCluster(t, 3)
	leader := c.waitLeader()
	follower := c.ids[0]
	if follower == leader {
		follower = c.ids[1]
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	g := &gated{release: make(chan struct{}, 16), started: make(chan string, 16)}
	defer startWorker(c.workerConn(), "w", g)()
	// Through a follower: the calls are forwarded to the leader.
	conn := c.nodeConn(follower)
	ops := longrunningpb.NewOperationsClient(conn)
	ex := repb.NewExecutionClient(conn)
	code := func(err error) codes.Code { return status.Code(err) }
	// gone waits until no replica has operation name.
	gone := func(name string) {
		t.Helper()
		waitFor(t, 10*time.Second, "every replica removing "+name, func() bool {
			for _, tn := range c.nodes {
				var ok bool
				tn.n.Read(func(s *stateT) { _, ok = s.Operation(name) })
				if ok {
					return false
				}
			}
			return true
		})
	}
	// execute starts an Execute of action i and returns its stream and
	// the operation's name, from the first message.
	execute := func(i int) (grpc.ServerStreamingClient[longrunningpb.Operation], string) {
		t.Helper()
		stream, err := ex.Execute(ctx, &repb.ExecuteRequest{ActionDigest: c.actionCache(i, true)})
		if err != nil {
			t.Fatal(err)
		}
		op, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return stream, op.Name
	}
	// finish reads a stream to its end and returns the last operation.
	finish := func(stream grpc.ServerStreamingClient[longrunningpb.Operation]) *longrunningpb.Operation {
		t.Helper()
		var last *longrunningpb.Operation
		for {
			op, err := stream.Recv()
			if err != nil {
				if last == nil || !last.Done {
					t.Fatalf("stream ended with %v before the operation completed (last %v)", err, last)
				}
				return last
			}
			last = op
		}
	}
	isDone := func(op *longrunningpb.Operation) bool {
		var r repb.ExecuteResponse
		return op.Done && op.GetResponse().UnmarshalTo(&r) == nil && r.Result != nil && r.Status.GetCode() == 0
	}

	// Unknown names.
	if _, err := ops.DeleteOperation(ctx, &longrunningpb.DeleteOperationRequest{Name: "operations/nope"}); code(err) != codes.NotFound {
		t.Fatalf("delete of an unknown operation: %v", err)
	}

	// A completed operation: removed everywhere.
	s1, done1 := execute(1)
	<-g.started
	g.release <- struct{}{}
	if op := finish(s1); !isDone(op) {
		t.Fatalf("first action: %v", op)
	}
	if _, err := ops.DeleteOperation(ctx, &longrunningpb.DeleteOperationRequest{Name: done1}); err != nil {
		t.Fatal(err)
	}
	if _, err := ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: done1}); code(err) != codes.NotFound {
		t.Fatalf("GetOperation after delete: %v", err)
	}
	gone(done1)
	if _, err := ops.DeleteOperation(ctx, &longrunningpb.DeleteOperationRequest{Name: done1}); code(err) != codes.NotFound {
		t.Fatalf("second delete: %v", err)
	}

	// An executing and a queued operation: deleted, not cancelled.
	s2, running := execute(2)
	<-g.started
	s3, queued := execute(3)
	s4, undone := execute(4)
	for _, name := range []string{running, queued, undone} {
		if _, err := ops.DeleteOperation(ctx, &longrunningpb.DeleteOperationRequest{Name: name}); err != nil {
			t.Fatalf("delete %s: %v", name, err)
		}
		op, err := ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: name})
		if err != nil || op.Done {
			t.Fatalf("GetOperation of a deleted operation in flight: %v %v", op, err)
		}
	}
	// A WaitExecution undoes the delete of the last one.
	wait4, err := ex.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: undone})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wait4.Recv(); err != nil {
		t.Fatal(err)
	}
	// A WaitOperation on the queued one waits for its end.
	waited := make(chan *longrunningpb.Operation, 1)
	go func() {
		op, err := ops.WaitOperation(ctx, &longrunningpb.WaitOperationRequest{Name: queued, Timeout: durationpb.New(30 * time.Second)})
		if err != nil {
			t.Errorf("WaitOperation: %v", err)
		}
		waited <- op
	}()
	// Each completes; the streams that follow it get the result.
	for range 3 {
		g.release <- struct{}{}
	}
	for i, s := range []grpc.ServerStreamingClient[longrunningpb.Operation]{s2, s3, s4, wait4} {
		if op := finish(s); !isDone(op) {
			t.Errorf("stream %d: %v", i, op)
		}
	}
	if op := <-waited; op == nil || !isDone(op) {
		t.Errorf("WaitOperation: %v", op)
	}
	if n := g.cancelled.Load(); n != 0 {
		t.Errorf("%d actions cancelled", n)
	}
	gone(running)
	gone(queued)
	if op, err := ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: undone}); err != nil || !isDone(op) {
		t.Errorf("the operation whose delete was undone: %v %v", op, err)
	}
	// Their results were cached as usual.
	stream, err := ex.Execute(ctx, &repb.ExecuteRequest{ActionDigest: c.actionCache(2, true)})
	if err != nil {
		t.Fatal(err)
	}
	if op := finish(stream); !isDone(op) {
		t.Errorf("cached result of a deleted operation: %v", op)
	} else {
		var r repb.ExecuteResponse
		op.GetResponse().UnmarshalTo(&r)
		if !r.CachedResult {
			t.Errorf("the deleted operation's result was not cached: %v", op)
		}
	}
}
