package scheduler

import (
	"bytes"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	"tvixfarm/scheduler/state"
)

type sink struct{ bytes.Buffer }

func (s *sink) ID() string    { return "test" }
func (s *sink) Cancel() error { return nil }
func (s *sink) Close() error  { return nil }

func entry(t *testing.T, typ byte, m any) *raft.Log {
	var data []byte
	var err error
	if pm, ok := m.(proto.Message); ok {
		data, err = proto.Marshal(pm)
	} else {
		data, err = json.Marshal(m)
	}
	if err != nil {
		t.Fatal(err)
	}
	return &raft.Log{Type: raft.LogCommand, Data: append([]byte{typ}, data...)}
}

// TestFSMSnapshotRestore: a restored FSM has the same state and members,
// and answers the next entries as the original does.
func TestFSMSnapshotRestore(t *testing.T) {
	a := newFSM(state.Config{}, nil, nil)
	a.Apply(entry(t, entryMember, member{ID: "n1", Client: "127.0.0.1:1"}))
	batch := &schedulerpb.Batch{Commands: []*schedulerpb.Command{
		{Command: &schedulerpb.Command_RegisterWorker{RegisterWorker: &schedulerpb.RegisterWorker{Worker: "w", Slots: 1, TimeUnixNano: 1}}},
		{Command: &schedulerpb.Command_Submit{Submit: &schedulerpb.Submit{Operation: "op1", DigestFunction: 1, ActionDigest: &schedulerpb.Digest{Hash: strings.Repeat("a", 64), SizeBytes: 1}, Waiter: "c1", TimeUnixNano: 2}}},
		{Command: &schedulerpb.Command_Submit{Submit: &schedulerpb.Submit{Operation: "op2", DigestFunction: 1, ActionDigest: &schedulerpb.Digest{Hash: strings.Repeat("b", 64), SizeBytes: 1}, Waiter: "c2", TimeUnixNano: 3}}},
	}}
	if r, ok := a.Apply(entry(t, entryBatch, batch)).(*state.Response); !ok || len(r.Assignments) != 1 {
		t.Fatalf("apply: %v", r)
	}
	snap, err := a.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var s sink
	if err := snap.Persist(&s); err != nil {
		t.Fatal(err)
	}
	b := newFSM(state.Config{}, nil, nil)
	if err := b.Restore(io.NopCloser(bytes.NewReader(s.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if b.client("n1") != "127.0.0.1:1" {
		t.Errorf("members not restored: %v", b.members)
	}
	var sa, sb bytes.Buffer
	a.st.Snapshot(&sa)
	b.st.Snapshot(&sb)
	if !bytes.Equal(sa.Bytes(), sb.Bytes()) {
		t.Error("restored state differs")
	}
	next := &schedulerpb.Batch{Commands: []*schedulerpb.Command{{Command: &schedulerpb.Command_Complete{Complete: &schedulerpb.Complete{Operation: "op1", Worker: "w", Lease: 1, TimeUnixNano: 4}}}}}
	ra := a.Apply(entry(t, entryBatch, next)).(*state.Response)
	rb := b.Apply(entry(t, entryBatch, next)).(*state.Response)
	if len(ra.Completions) != 1 || len(rb.Completions) != 1 || len(ra.Assignments) != len(rb.Assignments) {
		t.Errorf("responses differ after restore: %+v vs %+v", ra, rb)
	}
	if err := b.Restore(io.NopCloser(bytes.NewReader([]byte("garbage")))); err == nil {
		t.Error("garbage restored")
	}
}
