package farm_test

import (
	"context"
	"errors"
	"io"
	"os"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
)

// requireSandbox skips (or, under make test, fails) without root.
func requireSandbox(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("TVIXFARM_REQUIRE_SANDBOX") == "1" {
			t.Fatal("sandbox required: not root")
		}
		t.Skip("the sandbox needs root")
	}
}

// uploadAction stores a Bazel-style action (the host's /bin/sh -c script,
// output out.txt) and returns its digest.
func uploadAction(t *testing.T, conn *grpc.ClientConn, script string, doNotCache bool) *repb.Digest {
	t.Helper()
	cmd := &repb.Command{
		Arguments:   []string{"/bin/sh", "-c", script},
		OutputPaths: []string{"out.txt"},
		Platform:    &repb.Platform{Properties: []*repb.Platform_Property{{Name: "OSFamily", Value: "linux"}}},
	}
	cmdData, _ := proto.Marshal(cmd)
	emptyDir := sha(nil)
	action := &repb.Action{CommandDigest: sha(cmdData), InputRootDigest: emptyDir, DoNotCache: doNotCache,
		Platform: cmd.Platform, Timeout: durationpb.New(time.Minute)}
	actionData, _ := proto.Marshal(action)
	batchUpload(t, conn, "", cmdData, actionData)
	return sha(actionData)
}

// execute runs Execute and returns the stages seen and the final response.
func execute(ctx context.Context, conn *grpc.ClientConn, req *repb.ExecuteRequest) ([]repb.ExecutionStage_Value, string, *repb.ExecuteResponse, error) {
	stream, err := repb.NewExecutionClient(conn).Execute(ctx, req)
	if err != nil {
		return nil, "", nil, err
	}
	return follow(stream)
}

func follow(stream grpc.ServerStreamingClient[longrunningpb.Operation]) ([]repb.ExecutionStage_Value, string, *repb.ExecuteResponse, error) {
	var stages []repb.ExecutionStage_Value
	var name string
	for {
		op, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stages, name, nil, errors.New("stream ended before the operation completed")
		}
		if err != nil {
			return stages, name, nil, err
		}
		name = op.Name
		var md repb.ExecuteOperationMetadata
		if op.Metadata.UnmarshalTo(&md) == nil {
			stages = append(stages, md.Stage)
		}
		if op.Done {
			var resp repb.ExecuteResponse
			if err := op.GetResponse().UnmarshalTo(&resp); err != nil {
				return stages, name, nil, err
			}
			return stages, name, &resp, nil
		}
	}
}

// TestExecuteEndToEnd runs REAPI actions through `tvixfarm serve`'s
// default roles: the scheduler (a one-node raft cluster) assigns them to
// the in-process executor over the worker protocol, which runs them in
// the sandbox; results are cached unless do_not_cache.
func TestExecuteEndToEnd(t *testing.T) {
	requireSandbox(t)
	r := start(t, testConfig(t.TempDir()))
	ctx := ctxT(t)

	caps, err := repb.NewCapabilitiesClient(r.conn).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{})
	if err != nil || !caps.GetExecutionCapabilities().GetExecEnabled() {
		t.Fatalf("capabilities: %v, %v", caps, err)
	}

	ad := uploadAction(t, r.conn, "echo hello > out.txt; echo done", false)
	stages, name, resp, err := execute(ctx, r.conn, &repb.ExecuteRequest{ActionDigest: ad})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status.GetCode() != 0 || resp.Result.GetExitCode() != 0 || resp.CachedResult {
		t.Fatalf("response %v", resp)
	}
	if len(resp.Result.OutputFiles) != 1 || resp.Result.OutputFiles[0].Digest.Hash != sha([]byte("hello\n")).Hash {
		t.Errorf("outputs %v", resp.Result.OutputFiles)
	}
	if stages[len(stages)-1] != repb.ExecutionStage_COMPLETED || stages[0] == repb.ExecutionStage_COMPLETED {
		t.Errorf("stages %v", stages)
	}
	if md := resp.Result.ExecutionMetadata; md.GetWorker() == "" || md.GetQueuedTimestamp() == nil {
		t.Errorf("metadata %v", md)
	}
	// The operation can be read and waited for by name.
	ops := longrunningpb.NewOperationsClient(r.conn)
	if op, err := ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: name}); err != nil || !op.Done {
		t.Errorf("GetOperation %s: %v %v", name, op, err)
	}
	ws, err := repb.NewExecutionClient(r.conn).WaitExecution(ctx, &repb.WaitExecutionRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, wresp, err := follow(ws); err != nil || wresp.Result.GetExitCode() != 0 {
		t.Errorf("WaitExecution: %v %v", wresp, err)
	}
	list, err := ops.ListOperations(ctx, &longrunningpb.ListOperationsRequest{Filter: "stage=completed"})
	if err != nil || len(list.Operations) != 1 {
		t.Errorf("ListOperations: %v %v", list, err)
	}

	// Again: from the action cache, unless skip_cache_lookup.
	_, _, resp, err = execute(ctx, r.conn, &repb.ExecuteRequest{ActionDigest: ad})
	if err != nil || !resp.CachedResult {
		t.Fatalf("second execute: %v %v", resp, err)
	}
	_, _, resp, err = execute(ctx, r.conn, &repb.ExecuteRequest{ActionDigest: ad, SkipCacheLookup: true})
	if err != nil || resp.CachedResult || resp.Result.GetExitCode() != 0 {
		t.Fatalf("execute skipping the cache: %v %v", resp, err)
	}

	// do_not_cache and failures are not cached.
	for _, a := range []*repb.Digest{uploadAction(t, r.conn, "echo x > out.txt", true), uploadAction(t, r.conn, "exit 3", false)} {
		for i := range 2 {
			_, _, resp, err := execute(ctx, r.conn, &repb.ExecuteRequest{ActionDigest: a})
			if err != nil || resp.CachedResult {
				t.Fatalf("run %d: %v %v", i, resp, err)
			}
		}
	}

	// An action that no worker can run fails (after the grace period,
	// which the default config makes 30 s: the queued op waits).
	// A missing action is FAILED_PRECONDITION with a MISSING violation.
	_, _, _, err = execute(ctx, r.conn, &repb.ExecuteRequest{ActionDigest: sha([]byte("no such action"))})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("missing action: %v", err)
	}
}

// TestCancelOperation cancels a running action: the executor kills its
// sandbox and the operation completes as CANCELLED.
func TestCancelOperation(t *testing.T) {
	requireSandbox(t)
	r := start(t, testConfig(t.TempDir()))
	ctx := ctxT(t)
	ad := uploadAction(t, r.conn, "sleep 600", false)
	stream, err := repb.NewExecutionClient(r.conn).Execute(ctx, &repb.ExecuteRequest{ActionDigest: ad})
	if err != nil {
		t.Fatal(err)
	}
	var name string
	for {
		op, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		name = op.Name
		var md repb.ExecuteOperationMetadata
		op.Metadata.UnmarshalTo(&md)
		if md.Stage == repb.ExecutionStage_EXECUTING {
			break
		}
	}
	start := time.Now()
	if _, err := longrunningpb.NewOperationsClient(r.conn).CancelOperation(ctx, &longrunningpb.CancelOperationRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	_, _, resp, err := follow(stream)
	if err != nil || resp.Status.GetCode() != int32(codes.Canceled) {
		t.Fatalf("after cancel: %v %v", resp, err)
	}
	// The sandbox is killed: the executor's slot frees up.
	deadline := time.Now().Add(20 * time.Second)
	for r.f.Executor().Running() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the cancelled action still runs %s later", time.Since(start))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
