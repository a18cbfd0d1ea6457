package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	longrunningpb "cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/frontend/translate"
)

// requestMetadataKey is the REAPI RequestMetadata header.
const requestMetadataKey = "build.bazel.remote.execution.v2.requestmetadata-bin"

// maxRetries bounds the retries of an execution whose RPC fails with
// UNAVAILABLE (a scheduler failover) or whose stream ends early.
const maxRetries = 20

// executeAction runs act on the farm and returns its response. The
// priority orders it in the farm's queue (lower runs sooner). onExecuting
// is called once when the farm reports that it runs.
func (r *run) executeAction(ctx context.Context, n *node, act *translate.Action, priority int32, skipCache bool, onExecuting func()) (*repb.ExecuteResponse, error) {
	md, _ := proto.Marshal(&repb.RequestMetadata{
		ToolDetails:      &repb.ToolDetails{ToolName: "tvixfarm"},
		ActionId:         act.Digest.Hex(),
		ToolInvocationId: r.c.cfg.InvocationID,
		TargetId:         n.drv.Path,
		ActionMnemonic:   "NixBuild",
	})
	ctx = metadata.AppendToOutgoingContext(ctx, requestMetadataKey, string(md))
	req := &repb.ExecuteRequest{
		InstanceName:    r.c.farm.Instance,
		ActionDigest:    act.Digest.Proto(),
		DigestFunction:  act.Digest.Function().Proto(),
		ExecutionPolicy: &repb.ExecutionPolicy{Priority: priority},
		SkipCacheLookup: skipCache,
	}
	var name string
	executing := false
	delay := 100 * time.Millisecond
	for attempt := 0; ; attempt++ {
		var stream interface {
			Recv() (*longrunningOperation, error)
		}
		var err error
		if name == "" {
			var s repb.Execution_ExecuteClient
			s, err = r.c.farm.Execution.Execute(ctx, req)
			stream = opStream{s}
		} else {
			var s repb.Execution_WaitExecutionClient
			s, err = r.c.farm.Execution.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: name})
			stream = opStream{s}
		}
		for err == nil {
			var op *longrunningOperation
			op, err = stream.Recv()
			if err != nil {
				break
			}
			name = op.GetName()
			var meta repb.ExecuteOperationMetadata
			if op.GetMetadata().UnmarshalTo(&meta) == nil && meta.Stage == repb.ExecutionStage_EXECUTING && !executing {
				executing = true
				onExecuting()
			}
			if !op.GetDone() {
				continue
			}
			if e := op.GetError(); e != nil {
				return nil, status.ErrorProto(e)
			}
			var resp repb.ExecuteResponse
			if err := op.GetResponse().UnmarshalTo(&resp); err != nil {
				return nil, fmt.Errorf("operation %s: bad response: %w", name, err)
			}
			return &resp, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		retriable := errors.Is(err, io.EOF) || status.Code(err) == codes.Unavailable
		if status.Code(err) == codes.NotFound && name != "" {
			// The operation is gone (a restarted single-node farm):
			// submit again; the action cache makes this cheap if it ran.
			name, retriable = "", true
		}
		if !retriable || attempt >= maxRetries {
			if errors.Is(err, io.EOF) {
				err = errors.New("the operation stream ended before the operation completed")
			}
			return nil, err
		}
		r.c.log.Debug("execution interrupted; resuming", "drv", n.drv.Path, "op", name, "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

type longrunningOperation = longrunningpb.Operation

// opStream adapts Execute and WaitExecution streams.
type opStream struct {
	s interface {
		Recv() (*longrunningpb.Operation, error)
	}
}

func (o opStream) Recv() (*longrunningOperation, error) { return o.s.Recv() }
