package state

import (
	"cmp"
	"fmt"
	"io"
	"slices"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// snapshotVersion is the version of the Snapshot format written.
const snapshotVersion = 1

// Snapshot writes the whole state to w as a serialized
// schedulerpb.Snapshot. Identical states give identical bytes.
func (s *State) Snapshot(w io.Writer) error {
	return WriteSnapshot(w, s.Capture())
}

// Capture returns the whole state as a message that shares nothing
// mutable with s: Apply may go on while it is written with WriteSnapshot
// (in a raft FSMSnapshot's Persist, say). The caller must not modify it.
func (s *State) Capture() *schedulerpb.Snapshot { return s.snapshot() }

// WriteSnapshot writes snap, from Capture, to w as Snapshot does.
func WriteSnapshot(w io.Writer, snap *schedulerpb.Snapshot) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(snap)
	if err != nil {
		return fmt.Errorf("marshal scheduler snapshot: %w", err)
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write scheduler snapshot: %w", err)
	}
	return nil
}

func (s *State) snapshot() *schedulerpb.Snapshot {
	snap := &schedulerpb.Snapshot{
		Version:       snapshotVersion,
		NextSequence:  s.nextSeq,
		NextLease:     s.nextLease,
		ClockUnixNano: s.clock,
		Workers:       s.Workers(),
		Operations:    s.Operations(schedulerpb.Stage_STAGE_UNSPECIFIED),
	}
	for _, g := range s.busy { // by key
		for _, l := range g.sorted {
			ls := &schedulerpb.LevelState{PlatformKey: g.key, Priority: l.priority, LastServed: l.lastServed}
			for _, q := range l.order {
				ls.Invocations = append(ls.Invocations, &schedulerpb.InvocationState{InvocationId: q.id, LastServed: q.lastServed})
			}
			slices.SortFunc(ls.Invocations, func(a, b *schedulerpb.InvocationState) int {
				return strings.Compare(a.InvocationId, b.InvocationId)
			})
			snap.Levels = append(snap.Levels, ls)
		}
	}
	return snap
}

// Restore replaces the state with the one Snapshot wrote to r. On error,
// the state is unchanged.
func (s *State) Restore(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return fmt.Errorf("read scheduler snapshot: %w", err)
	}
	snap := &schedulerpb.Snapshot{}
	if err := proto.Unmarshal(b, snap); err != nil {
		return fmt.Errorf("unmarshal scheduler snapshot: %w", err)
	}
	n := New(s.cfg)
	if err := n.restore(snap); err != nil {
		return fmt.Errorf("restore scheduler snapshot: %w", err)
	}
	*s = *n
	return nil
}

func (s *State) restore(snap *schedulerpb.Snapshot) error {
	if snap.GetVersion() != snapshotVersion {
		return fmt.Errorf("unsupported version %d", snap.GetVersion())
	}
	s.nextSeq, s.nextLease, s.clock = snap.GetNextSequence(), snap.GetNextLease(), snap.GetClockUnixNano()
	for _, p := range snap.GetWorkers() {
		if p.GetId() == "" || s.workers[p.GetId()] != nil {
			return fmt.Errorf("empty or duplicate worker id %q", p.GetId())
		}
		s.workers[p.GetId()] = &worker{
			id:         p.GetId(),
			platform:   p.GetPlatform(),
			offers:     s.offers(p.GetPlatform()),
			slots:      p.GetSlots(),
			drained:    p.GetDrained(),
			registered: p.GetRegisteredUnixNano(),
		}
	}
	for _, p := range snap.GetOperations() {
		if err := s.restoreOp(p); err != nil {
			return fmt.Errorf("operation %q: %w", p.GetName(), err)
		}
	}
	slices.SortStableFunc(s.done, func(a, b *operation) int { return cmp.Compare(a.doneAt, b.doneAt) })
	for _, ls := range snap.GetLevels() {
		// A level that does not exist (a changed configuration changed its
		// platform key) starts afresh.
		g := s.groups[ls.GetPlatformKey()]
		if g == nil || g.levels[ls.GetPriority()] == nil {
			continue
		}
		l := g.levels[ls.GetPriority()]
		l.lastServed = ls.GetLastServed()
		for _, is := range ls.GetInvocations() {
			if q := l.invs[is.GetInvocationId()]; q != nil {
				q.lastServed = is.GetLastServed()
				l.order.fix(q.index)
			}
		}
	}
	return nil
}

func (s *State) restoreOp(p *schedulerpb.Operation) error {
	d := p.GetActionDigest()
	op := &operation{
		name:       p.GetName(),
		key:        actionKey{instance: p.GetInstanceName(), fn: p.GetDigestFunction(), hash: d.GetHash(), size: d.GetSizeBytes()},
		digest:     d,
		platform:   p.GetPlatform(),
		priority:   p.GetPriority(),
		invocation: p.GetInvocationId(),
		waiters:    p.GetWaiters(),
		cancelOnDC: p.GetCancelOnDisconnect(),
		seq:        p.GetSequence(),
		stage:      p.GetStage(),
		attempts:   p.GetAttempts(),
		queuedAt:   p.GetQueuedUnixNano(),
		startedAt:  p.GetStartedUnixNano(),
		doneAt:     p.GetCompletedUnixNano(),
		result:     p.GetResult(),
		code:       codes.Code(p.GetStatus().GetCode()),
		message:    p.GetStatus().GetMessage(),
		deleted:    p.GetDeleted(),
		doNotCache: p.GetDoNotCache(),
	}
	switch {
	case op.name == "" || s.ops[op.name] != nil:
		return fmt.Errorf("empty or duplicate name")
	case op.seq == 0 || op.seq >= s.nextSeq:
		return fmt.Errorf("sequence %d out of range", op.seq)
	case op.deleted && op.stage == schedulerpb.Stage_STAGE_COMPLETED:
		return fmt.Errorf("completed and deleted")
	}
	if op.stage != schedulerpb.Stage_STAGE_COMPLETED {
		if s.inFlight[op.key] != nil {
			return fmt.Errorf("duplicate in-flight action")
		}
		s.inFlight[op.key] = op
	}
	switch op.stage {
	case schedulerpb.Stage_STAGE_QUEUED:
		s.queue(op)
	case schedulerpb.Stage_STAGE_EXECUTING:
		w := s.workers[p.GetWorker()]
		switch {
		case w == nil:
			return fmt.Errorf("unknown worker %q", p.GetWorker())
		case p.GetLease() == 0 || p.GetLease() >= s.nextLease:
			return fmt.Errorf("lease %d out of range", p.GetLease())
		}
		s.lease(op, w, p.GetLease())
	case schedulerpb.Stage_STAGE_COMPLETED:
		s.done = append(s.done, op)
	default:
		return fmt.Errorf("invalid stage %v", op.stage)
	}
	s.ops[op.name] = op
	return nil
}
