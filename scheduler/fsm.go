package scheduler

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sync"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	"tvixfarm/scheduler/state"
)

// A raft log entry is a tag byte and a payload.
const (
	// entryBatch carries a schedulerpb.Batch for the state.
	entryBatch byte = 1
	// entryMember carries a JSON member: the client address of a node,
	// which followers need to forward calls to the leader.
	entryMember byte = 2
)

// snapshotMagic starts a snapshot: then a uvarint length and the JSON
// members, then the state's own snapshot.
const snapshotMagic = "TFSCHED1"

// member is a node's address for clients, replicated so that any node can
// forward to the leader.
type member struct {
	ID     string `json:"id"`
	Client string `json:"client"`
	Remove bool   `json:"remove,omitempty"`
}

// fsm is the raft.FSM: the state, plus the members' client addresses. Its
// Apply runs on every node in log order; after each batch it hands the
// response to onApply (outside the lock), which must not block.
type fsm struct {
	mu      sync.RWMutex
	st      *state.State
	members map[string]string // node id -> client address

	// locked, if set, is called with every batch's response before the
	// state's lock is released, so that what it records is visible no
	// later than the change; it must be quick. onApply is called after.
	locked  func(*state.Response)
	onApply func(*state.Response)

	// applied is the index of the last entry applied; appliedCh is
	// closed (and replaced) whenever it grows.
	amu       sync.Mutex
	applied   uint64
	appliedCh chan struct{}
}

func newFSM(cfg state.Config, locked, onApply func(*state.Response)) *fsm {
	return &fsm{st: state.New(cfg), members: make(map[string]string), locked: locked, onApply: onApply, appliedCh: make(chan struct{})}
}

// setApplied records that the entry at index has been applied.
func (f *fsm) setApplied(index uint64) {
	f.amu.Lock()
	if index > f.applied {
		f.applied = index
		close(f.appliedCh)
		f.appliedCh = make(chan struct{})
	}
	f.amu.Unlock()
}

// waitApplied waits until the entry at index has been applied.
func (f *fsm) waitApplied(ctx context.Context, index uint64) error {
	for {
		f.amu.Lock()
		applied, ch := f.applied, f.appliedCh
		f.amu.Unlock()
		if applied >= index {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Apply applies one log entry. For a batch it returns the
// *state.Response; for anything else nil (or an error for a corrupt
// entry, which a correct leader never writes).
func (f *fsm) Apply(l *raft.Log) any {
	defer f.setApplied(l.Index)
	if l.Type != raft.LogCommand || len(l.Data) == 0 {
		return nil
	}
	switch l.Data[0] {
	case entryBatch:
		var b schedulerpb.Batch
		if err := proto.Unmarshal(l.Data[1:], &b); err != nil {
			return fmt.Errorf("scheduler: log entry %d: %w", l.Index, err)
		}
		f.mu.Lock()
		resp := f.st.Apply(&b)
		if f.locked != nil {
			f.locked(resp)
		}
		f.mu.Unlock()
		if f.onApply != nil {
			f.onApply(resp)
		}
		return resp
	case entryMember:
		var m member
		if err := json.Unmarshal(l.Data[1:], &m); err != nil {
			return fmt.Errorf("scheduler: log entry %d: %w", l.Index, err)
		}
		f.mu.Lock()
		if m.Remove {
			delete(f.members, m.ID)
		} else {
			f.members[m.ID] = m.Client
		}
		f.mu.Unlock()
		return nil
	}
	return fmt.Errorf("scheduler: log entry %d: unknown type %d", l.Index, l.Data[0])
}

// read calls fn with the state, which it must only read.
func (f *fsm) read(fn func(*state.State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.st)
}

// client returns the client address of node id.
func (f *fsm) client(id string) string {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.members[id]
}

// Snapshot captures the state now (raft does not apply entries during
// this call); Persist serialises it later, while entries apply.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	ms := make([]member, 0, len(f.members))
	for _, id := range slices.Sorted(maps.Keys(f.members)) {
		ms = append(ms, member{ID: id, Client: f.members[id]})
	}
	return &snapshot{members: ms, state: f.st.Capture()}, nil
}

// Restore replaces the state with a snapshot.
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	r := bufio.NewReader(rc)
	magic := make([]byte, len(snapshotMagic))
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != snapshotMagic {
		return errors.New("scheduler: restore: not a scheduler snapshot")
	}
	n, err := binary.ReadUvarint(r)
	if err != nil || n > 64<<20 {
		return fmt.Errorf("scheduler: restore: members: %v", err)
	}
	js := make([]byte, n)
	if _, err := io.ReadFull(r, js); err != nil {
		return fmt.Errorf("scheduler: restore: %w", err)
	}
	var ms []member
	if err := json.Unmarshal(js, &ms); err != nil {
		return fmt.Errorf("scheduler: restore: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.st.Restore(r); err != nil {
		return fmt.Errorf("scheduler: restore: %w", err)
	}
	f.members = make(map[string]string, len(ms))
	for _, m := range ms {
		f.members[m.ID] = m.Client
	}
	return nil
}

// snapshot is a captured state.
type snapshot struct {
	members []member
	state   *schedulerpb.Snapshot
}

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	err := func() error {
		js, err := json.Marshal(s.members)
		if err != nil {
			return err
		}
		w := bufio.NewWriterSize(sink, 1<<20)
		w.WriteString(snapshotMagic)
		w.Write(binary.AppendUvarint(nil, uint64(len(js))))
		w.Write(js)
		if err := state.WriteSnapshot(w, s.state); err != nil {
			return err
		}
		return w.Flush()
	}()
	if err != nil {
		sink.Cancel()
		return fmt.Errorf("scheduler: snapshot: %w", err)
	}
	return sink.Close()
}

func (s *snapshot) Release() {}

// memberIDs returns the nodes whose client address is known.
func (f *fsm) memberIDs() []string {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return slices.Sorted(maps.Keys(f.members))
}
