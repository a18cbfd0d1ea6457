package scheduler

import (
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// TestToOperationResult checks that a completed operation's result reaches
// clients as the ExecuteResponse it decodes to, with an OK status filled
// in when the executor left it out, whether the stored result is passed on
// as it is or decoded first.
func TestToOperationResult(t *testing.T) {
	withStatus, _ := proto.Marshal(&repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 3}, Status: &statuspb.Status{Code: 0}, Message: "hi"})
	noStatus, _ := proto.Marshal(&repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 3}, Message: "hi"})
	failed, _ := proto.Marshal(&repb.ExecuteResponse{Status: &statuspb.Status{Code: 4, Message: "deadline"}})
	for _, c := range []struct {
		name   string
		result []byte
		want   *repb.ExecuteResponse
	}{
		{"with status", withStatus, &repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 3}, Status: &statuspb.Status{}, Message: "hi"}},
		{"without status", noStatus, &repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 3}, Status: &statuspb.Status{}, Message: "hi"}},
		{"failed", failed, &repb.ExecuteResponse{Status: &statuspb.Status{Code: 4, Message: "deadline"}}},
		{"empty", nil, &repb.ExecuteResponse{Status: &statuspb.Status{}}},
	} {
		op := &schedulerpb.Operation{Name: "op", Stage: schedulerpb.Stage_STAGE_COMPLETED, DigestFunction: 1,
			ActionDigest: &schedulerpb.Digest{Hash: strings.Repeat("a", 64), SizeBytes: 1}, Result: c.result}
		lop := toOperation(op)
		if !lop.Done {
			t.Fatalf("%s: not done", c.name)
		}
		var got repb.ExecuteResponse
		if err := lop.GetResponse().UnmarshalTo(&got); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if !proto.Equal(&got, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, &got, c.want)
		}
		var md repb.ExecuteOperationMetadata
		if err := lop.Metadata.UnmarshalTo(&md); err != nil || md.Stage != repb.ExecutionStage_COMPLETED || md.ActionDigest.GetSizeBytes() != 1 {
			t.Errorf("%s: metadata %v, %v", c.name, &md, err)
		}
	}
	if hasStatus([]byte{0x1a, 0x05, 0x00}) {
		t.Error("hasStatus accepted a truncated field")
	}
}
