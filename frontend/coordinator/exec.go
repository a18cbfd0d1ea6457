package coordinator

import (
	"context"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	"tvixfarm/frontend/reapiexec"
	"tvixfarm/frontend/translate"
)

// requestMetadataKey is the REAPI RequestMetadata header.
const requestMetadataKey = "build.bazel.remote.execution.v2.requestmetadata-bin"

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
	return reapiexec.Run(ctx, r.c.farm.Execution, req, reapiexec.Options{
		OnExecuting: onExecuting,
		Logger:      r.c.log.With("drv", n.drv.Path),
	})
}
