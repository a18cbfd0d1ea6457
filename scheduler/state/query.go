package state

import (
	"cmp"
	"slices"
	"strings"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// The queries return fresh messages, which share slices, byte slices and
// messages with the state: callers must not modify anything in them.

// Operation returns the operation called name.
func (s *State) Operation(name string) (*schedulerpb.Operation, bool) {
	op := s.ops[name]
	if op == nil {
		return nil, false
	}
	return op.proto(), true
}

// Stage returns the stage of operation name: a cheap Operation for
// following one.
func (s *State) Stage(name string) (schedulerpb.Stage, bool) {
	op := s.ops[name]
	if op == nil {
		return schedulerpb.Stage_STAGE_UNSPECIFIED, false
	}
	return op.stage, true
}

// Operations returns the operations in stage (all of them for
// STAGE_UNSPECIFIED), in the order they were submitted.
func (s *State) Operations(stage schedulerpb.Stage) []*schedulerpb.Operation {
	ops := s.sortedOps(stage)
	out := make([]*schedulerpb.Operation, len(ops))
	for i, op := range ops {
		out[i] = op.proto()
	}
	return out
}

func (s *State) sortedOps(stage schedulerpb.Stage) []*operation {
	// Sort entries, which hold the sequence: comparisons do not touch
	// the operations.
	var es []entry
	for _, op := range s.ops {
		if stage == schedulerpb.Stage_STAGE_UNSPECIFIED || op.stage == stage {
			es = append(es, entry{seq: op.seq, op: op})
		}
	}
	slices.SortFunc(es, func(a, b entry) int { return cmp.Compare(a.seq, b.seq) })
	ops := make([]*operation, len(es))
	for i, e := range es {
		ops[i] = e.op
	}
	return ops
}

// Action is what the action cache needs to know of an operation's action.
type Action struct {
	Instance       string
	DigestFunction int32
	Digest         *schedulerpb.Digest
	// DoNotCache is the Action's do_not_cache.
	DoNotCache bool
}

// Leased returns the action of operation name if it is executing under
// lease.
func (s *State) Leased(name string, lease uint64) (Action, bool) {
	op := s.ops[name]
	if op == nil || op.stage != schedulerpb.Stage_STAGE_EXECUTING || op.lease != lease {
		return Action{}, false
	}
	return Action{Instance: op.key.instance, DigestFunction: op.key.fn, Digest: op.digest, DoNotCache: op.doNotCache}, true
}

// InFlight returns the name of the queued or executing operation for an
// action, if there is one: the operation a Submit of it would join.
func (s *State) InFlight(instance string, fn int32, d *schedulerpb.Digest) (string, bool) {
	op := s.inFlight[actionKey{instance: instance, fn: fn, hash: d.GetHash(), size: d.GetSizeBytes()}]
	if op == nil {
		return "", false
	}
	return op.name, true
}

// QueueLength is the number of queued operations of one priority.
type QueueLength struct {
	Priority int32
	Queued   int
}

// QueueLengths returns the number of queued operations by priority, in
// ascending priority order.
func (s *State) QueueLengths() []QueueLength {
	out := make([]QueueLength, 0, len(s.queued))
	for p, n := range s.queued {
		out = append(out, QueueLength{Priority: p, Queued: n})
	}
	slices.SortFunc(out, func(a, b QueueLength) int { return cmp.Compare(a.Priority, b.Priority) })
	return out
}

// Workers returns the registered workers, by id.
func (s *State) Workers() []*schedulerpb.Worker {
	ws := s.sortedWorkers()
	out := make([]*schedulerpb.Worker, len(ws))
	for i, w := range ws {
		out[i] = w.proto()
	}
	return out
}

func (s *State) sortedWorkers() []*worker {
	ws := make([]*worker, 0, len(s.workers))
	for _, w := range s.workers {
		ws = append(ws, w)
	}
	slices.SortFunc(ws, func(a, b *worker) int { return strings.Compare(a.id, b.id) })
	return ws
}

func (op *operation) proto() *schedulerpb.Operation {
	p := &schedulerpb.Operation{
		Name:               op.name,
		Stage:              op.stage,
		InstanceName:       op.key.instance,
		DigestFunction:     op.key.fn,
		ActionDigest:       op.digest,
		Platform:           op.platform,
		Priority:           op.priority,
		InvocationId:       op.invocation,
		Waiters:            slices.Clip(op.waiters), // only ever replaced or appended to
		CancelOnDisconnect: op.cancelOnDC,
		Sequence:           op.seq,
		Attempts:           op.attempts,
		QueuedUnixNano:     op.queuedAt,
		StartedUnixNano:    op.startedAt,
		CompletedUnixNano:  op.doneAt,
		Result:             op.result,
		Deleted:            op.deleted,
		DoNotCache:         op.doNotCache,
	}
	if op.worker != nil {
		p.Worker, p.Lease = op.worker.id, op.lease
	}
	if op.stage == schedulerpb.Stage_STAGE_COMPLETED && op.code != 0 {
		p.Status = &schedulerpb.Status{Code: int32(op.code), Message: op.message}
	}
	return p
}

func (w *worker) proto() *schedulerpb.Worker {
	p := &schedulerpb.Worker{
		Id:                 w.id,
		Platform:           w.platform,
		Slots:              w.slots,
		Drained:            w.drained,
		RegisteredUnixNano: w.registered,
		Running:            make([]string, 0, w.running),
	}
	for op := w.leases; op != nil; op = op.next {
		p.Running = append(p.Running, op.name)
	}
	slices.Sort(p.Running)
	return p
}
