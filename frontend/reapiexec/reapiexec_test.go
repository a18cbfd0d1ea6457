package reapiexec

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	longrunningpb "cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// flaky is an Execution service with the faults Run must survive: Execute
// answers UNAVAILABLE once, then sends one EXECUTING update and drops the
// stream; WaitExecution drops once more before it completes.
type flaky struct {
	repb.UnimplementedExecutionServer
	t               *testing.T
	executes, waits atomic.Int32
}

func op(t *testing.T, stage repb.ExecutionStage_Value, resp *repb.ExecuteResponse) *longrunningpb.Operation {
	meta, err := anypb.New(&repb.ExecuteOperationMetadata{Stage: stage})
	if err != nil {
		t.Fatal(err)
	}
	o := &longrunningpb.Operation{Name: "operations/x", Metadata: meta}
	if resp != nil {
		r, err := anypb.New(resp)
		if err != nil {
			t.Fatal(err)
		}
		o.Done, o.Result = true, &longrunningpb.Operation_Response{Response: r}
	}
	return o
}

func (f *flaky) Execute(req *repb.ExecuteRequest, s grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	if f.executes.Add(1) == 1 {
		return status.Error(codes.Unavailable, "leader lost")
	}
	return s.Send(op(f.t, repb.ExecutionStage_EXECUTING, nil)) // then the stream ends: EOF
}

func (f *flaky) WaitExecution(req *repb.WaitExecutionRequest, s grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	if req.Name != "operations/x" {
		return status.Error(codes.NotFound, req.Name)
	}
	if f.waits.Add(1) == 1 {
		return status.Error(codes.Unavailable, "failover")
	}
	return s.Send(op(f.t, repb.ExecutionStage_COMPLETED, &repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 7}}))
}

func TestRunResumes(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	f := &flaky{t: t}
	repb.RegisterExecutionServer(srv, f)
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	executing := 0
	resp, err := Run(ctx, repb.NewExecutionClient(conn), &repb.ExecuteRequest{}, Options{OnExecuting: func() { executing++ }})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetResult().GetExitCode() != 7 || executing != 1 || f.executes.Load() != 2 || f.waits.Load() != 2 {
		t.Fatalf("resp %v, executing %d, executes %d, waits %d", resp, executing, f.executes.Load(), f.waits.Load())
	}
	// Execute now always drops its stream and WaitExecution completes:
	// with one retry allowed, that is still enough.
	if _, err := Run(ctx, repb.NewExecutionClient(conn), &repb.ExecuteRequest{}, Options{MaxRetries: 1}); err != nil {
		t.Fatal(err)
	}
}

func TestRunGivesUp(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	repb.RegisterExecutionServer(srv, repb.UnimplementedExecutionServer{})
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = Run(context.Background(), repb.NewExecutionClient(conn), &repb.ExecuteRequest{}, Options{})
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("err %v, want UNIMPLEMENTED at once", err)
	}
}
