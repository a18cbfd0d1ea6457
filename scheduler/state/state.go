// Package state is the replicated state machine of the scheduler: the
// operations (queued, executing, completed), the workers and their leases,
// and the dispatch of queued operations to workers.
//
// It is deterministic. Apply takes a batch of commands (one raft log entry)
// and its outcome depends only on the state and the batch: time comes inside
// the commands, set by the leader; nothing depends on the wall clock, on
// randomness or on the iteration order of Go maps. Applying the same batches
// to two fresh States gives identical responses and identical snapshots.
//
// A State is not safe for concurrent use. Queries only read, so they may run
// concurrently with each other but not with Apply or Restore: the caller
// holds a lock (a sync.RWMutex fits).
//
// # Dispatch
//
// Queued operations are grouped by platform: the canonical form of the
// properties a worker must match (all but Config.IgnoredKeys). Each group
// caches the workers that match it and the sum of their free slots, so a
// dispatch round looks only at the few groups that have both queued work
// and free slots. Within a group, operations are ordered by priority (lower
// first), then round robin over invocations (the one served least recently
// first; one that starts queueing joins the end of the round, so a large
// backlog does not starve a small one, nor the reverse), then FIFO. The
// best head of all eligible groups goes to the group's worker with the most
// free slots (the first by id among equals), which spreads the load.
//
// Dispatch runs once at the end of every Apply, so a batch's assignments
// see all of its commands (a Drain in the batch applies to the whole
// batch).
package state

import (
	"cmp"
	"slices"

	"google.golang.org/grpc/codes"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// Default configuration values.
const (
	DefaultMaxAttempts = 3
)

// DefaultIgnoredKeys are the platform properties that configure how an
// action runs rather than where (executor.OptionProperties).
var DefaultIgnoredKeys = []string{"network", "nix-pty", "memory-limit", "pids-limit", "cpu-limit", "min-memory"}

// DefaultListKeys are the platform properties whose values are
// comma-separated sets.
var DefaultListKeys = []string{"nix-features"}

// Config configures a State. Every replica must use the same Config.
type Config struct {
	// MaxAttempts is how many times an operation may be leased to a worker
	// and lost (the worker removed, or not running it after re-registering)
	// before it fails with UNAVAILABLE. Zero means DefaultMaxAttempts.
	MaxAttempts int
	// IgnoredKeys are platform property names not matched against workers.
	// Nil means DefaultIgnoredKeys; an empty slice ignores nothing.
	IgnoredKeys []string
	// ListKeys are platform property names whose values are comma-separated
	// sets: an operation's set must be a subset of the union of the
	// worker's. Nil means DefaultListKeys.
	ListKeys []string
}

// State is the scheduler's state machine. The zero value is not usable; use
// New.
type State struct {
	maxAttempts int32
	ignored     map[string]bool
	list        map[string]bool
	cfg         Config

	ops      map[string]*operation // every operation, by name
	inFlight map[actionKey]*operation
	workers  map[string]*worker
	groups   map[string]*group // by platform key; empty ones until Compact
	busy     []*group          // groups with queued operations, by key
	queued   map[int32]int     // number of queued operations by priority
	done     []*operation      // completed operations, by completion time

	nextSeq   uint64
	nextLease uint64
	clock     int64 // latest time of any applied command

	resp *Response // of the Apply in progress
	// submitted are the Submits of the Apply in progress: their result
	// index and operation.
	submitted []submitted

	// Buffers of groupFor.
	reqBuf []requirement
	keyBuf []byte
}

// New returns an empty State.
func New(cfg Config) *State {
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	if cfg.IgnoredKeys == nil {
		cfg.IgnoredKeys = DefaultIgnoredKeys
	}
	if cfg.ListKeys == nil {
		cfg.ListKeys = DefaultListKeys
	}
	s := &State{
		maxAttempts: int32(min(cfg.MaxAttempts, 1<<30)),
		ignored:     make(map[string]bool),
		list:        make(map[string]bool),
		cfg:         cfg,
		ops:         make(map[string]*operation),
		inFlight:    make(map[actionKey]*operation),
		workers:     make(map[string]*worker),
		groups:      make(map[string]*group),
		queued:      make(map[int32]int),
		nextSeq:     1,
		nextLease:   1,
	}
	for _, k := range cfg.IgnoredKeys {
		s.ignored[k] = true
	}
	for _, k := range cfg.ListKeys {
		s.list[k] = true
	}
	return s
}

// Response is the outcome of one Apply. It shares messages and byte
// slices with the state: the caller must not modify them.
type Response struct {
	// Results has one entry per command of the batch, in order.
	Results []Result
	// Assignments are the operations leased to workers in this batch, in
	// the order they were made. The leader sends them to the workers.
	Assignments []Assignment
	// Cancellations are operations workers must stop running.
	Cancellations []Cancellation
	// Completions are the operations that completed in this batch, so the
	// leader can answer their waiters.
	Completions []Completion
}

// Result is the outcome of one command.
type Result struct {
	// Err is why the command was rejected: a gRPC status error
	// (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS). A rejected command
	// changed nothing.
	Err error
	// Operation is the operation the command acted on; for Submit, the one
	// the client must follow.
	Operation string
	// Deduplicated is set when a Submit joined an operation that was
	// already queued or executing.
	Deduplicated bool
	// Stale is set when the command did nothing because the operation's
	// lease is not the one it names (Complete, Fail) or the operation has
	// already completed (Complete, Fail, Cancel, Attach).
	Stale bool
	// Cancelled is set when a Detach cancelled the operation.
	Cancelled bool
	// Removed is the number of operations a Compact or a Delete removed
	// (a Delete of a queued or executing operation removes nothing yet).
	Removed int
	// Executing is set on a Submit whose operation is executing at the
	// end of the batch (dispatch leased it, or it joined one that runs).
	Executing bool
}

// Assignment leases a queued operation to a worker.
type Assignment struct {
	Operation string
	Worker    string
	// Lease identifies this assignment; the worker returns it in Complete.
	// Leases are unique for the life of the state.
	Lease uint64
	// Attempt counts the assignments of the operation, from 1.
	Attempt        int32
	Instance       string
	DigestFunction int32
	ActionDigest   *schedulerpb.Digest
	Priority       int32
	// QueuedUnixNano is when the operation was first queued.
	QueuedUnixNano int64
}

// Cancellation tells a worker to stop running an operation.
type Cancellation struct {
	Operation string
	Worker    string
	// Lease is the lease cancelled, or 0 when the worker reported running
	// an operation that is not leased to it.
	Lease uint64
}

// Completion is an operation that completed.
type Completion struct {
	Operation string
	// Result is the serialized ExecuteResponse from the worker, or nil.
	Result []byte
	// Code and Message are the error when there is no Result (OK
	// otherwise).
	Code    codes.Code
	Message string
	// Waiters were waiting for it.
	Waiters []string
	// Deleted is set when the operation was removed as it completed,
	// because a Delete marked it: its final form, which queries no longer
	// return.
	Deleted *schedulerpb.Operation
}

// actionKey identifies an action for deduplication.
type actionKey struct {
	instance string
	fn       int32
	hash     string
	size     int64
}

// operation is one operation.
type operation struct {
	name       string
	key        actionKey
	digest     *schedulerpb.Digest // the action digest of key
	platform   []*schedulerpb.Property
	priority   int32
	invocation string
	waiters    []string
	cancelOnDC bool
	seq        uint64
	stage      schedulerpb.Stage
	attempts   int32
	queuedAt   int64
	startedAt  int64
	doneAt     int64
	result     []byte
	code       codes.Code
	message    string
	deleted    bool // removed when it completes (Delete)
	doNotCache bool

	// While queued.
	inv *invQueue
	gen uint32 // counts the times it was queued

	// While executing.
	worker     *worker
	lease      uint64
	prev, next *operation // in the worker's list of leases
}

// first reports whether o goes before p in dispatch order. Both are the
// heads of their invocation queues.
func (o *operation) first(p *operation) bool {
	if o.priority != p.priority {
		return o.priority < p.priority
	}
	if o.inv.lastServed != p.inv.lastServed {
		return o.inv.lastServed < p.inv.lastServed
	}
	return o.seq < p.seq
}

// worker is one registered worker.
type worker struct {
	id         string
	platform   []*schedulerpb.Property
	offers     offers
	slots      int32
	drained    bool
	registered int64
	running    int        // number of leases
	leases     *operation // first of its leases, linked by next
	groups     []*group   // the groups it matches
}

// free is the number of operations the worker may be given now.
func (w *worker) free() int {
	if w.drained {
		return 0
	}
	return max(0, int(w.slots)-w.running)
}

// leased returns the operations leased to w.
func (w *worker) leased() []*operation {
	ops := make([]*operation, 0, w.running)
	for op := w.leases; op != nil; op = op.next {
		ops = append(ops, op)
	}
	return ops
}

// adjust propagates a change of w's free slots (from before) to its groups.
func (s *State) adjust(w *worker, before int) {
	if d := w.free() - before; d != 0 {
		for _, g := range w.groups {
			g.free += d
		}
	}
}

// tick advances the clock to t (if later) and returns the clock.
func (s *State) tick(t int64) int64 {
	s.clock = max(s.clock, t)
	return s.clock
}

// Apply applies the commands of b in order, then assigns queued operations
// to free workers. Invalid commands are rejected (Result.Err) without
// changing anything. Apply keeps references to parts of b (platforms,
// results): the caller must not modify b afterwards.
func (s *State) Apply(b *schedulerpb.Batch) *Response {
	cmds := b.GetCommands()
	r := &Response{Results: make([]Result, len(cmds))}
	s.resp = r
	for i, c := range cmds {
		r.Results[i] = s.apply(c)
		if c.GetSubmit() != nil && r.Results[i].Err == nil {
			s.submitted = append(s.submitted, submitted{i, s.ops[r.Results[i].Operation]})
		}
	}
	s.dispatch()
	for _, sub := range s.submitted {
		r.Results[sub.i].Executing = sub.op.stage == schedulerpb.Stage_STAGE_EXECUTING
	}
	clear(s.submitted)
	s.submitted = s.submitted[:0]
	s.resp = nil
	return r
}

// submitted is a Submit of the Apply in progress.
type submitted struct {
	i  int
	op *operation
}

func (s *State) apply(c *schedulerpb.Command) Result {
	switch c := c.GetCommand().(type) {
	case *schedulerpb.Command_Submit:
		return s.submit(c.Submit)
	case *schedulerpb.Command_RegisterWorker:
		return s.registerWorker(c.RegisterWorker)
	case *schedulerpb.Command_RemoveWorker:
		return s.removeWorker(c.RemoveWorker)
	case *schedulerpb.Command_Drain:
		return s.drain(c.Drain)
	case *schedulerpb.Command_Complete:
		return s.complete(c.Complete)
	case *schedulerpb.Command_Fail:
		return s.fail(c.Fail)
	case *schedulerpb.Command_Cancel:
		return s.cancel(c.Cancel)
	case *schedulerpb.Command_Attach:
		return s.attach(c.Attach)
	case *schedulerpb.Command_Detach:
		return s.detach(c.Detach)
	case *schedulerpb.Command_Compact:
		return s.compact(c.Compact)
	case *schedulerpb.Command_Delete:
		return s.deleteOp(c.Delete)
	}
	return invalid("empty or unknown command")
}

// insertSorted inserts x into the sorted slice xs, unless it is there.
func insertSorted[T any, K cmp.Ordered](xs []T, x T, key func(T) K) []T {
	i, found := slices.BinarySearchFunc(xs, key(x), func(e T, k K) int { return cmp.Compare(key(e), k) })
	if found {
		return xs
	}
	return slices.Insert(xs, i, x)
}

// removeSorted removes the element with key k from the sorted slice xs.
func removeSorted[T any, K cmp.Ordered](xs []T, k K, key func(T) K) []T {
	i, found := slices.BinarySearchFunc(xs, k, func(e T, k K) int { return cmp.Compare(key(e), k) })
	if !found {
		return xs
	}
	return slices.Delete(xs, i, i+1)
}
