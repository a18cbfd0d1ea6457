package state

import (
	"slices"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// group holds the queued operations of one platform, and caches the workers
// that can run them.
type group struct {
	key     string
	reqs    []requirement
	workers []*worker // matching workers, by id
	free    int       // free slots of workers
	queued  int
	levels  map[int32]*level
	sorted  []*level // levels by ascending priority
}

// level holds the queued operations of one priority in a group.
type level struct {
	priority int32
	group    *group
	invs     map[string]*invQueue
	order    heap[*invQueue] // least recently served first
	// lastServed is the lease of the last operation dispatched from the
	// level. A new invocation queue starts with it: it joins the end of
	// the round, so an invocation that keeps emptying its queue does not
	// jump ahead of others every time.
	lastServed uint64
}

// invQueue holds the queued operations of one invocation in a level.
type invQueue struct {
	id    string
	level *level
	// ops is FIFO by sequence. An operation taken out from the middle
	// leaves a stale entry behind (so ordering never writes to the
	// operations); stale entries are never at the top.
	ops   heap[entry]
	live  int // number of entries that are not stale
	index int // in level.order
	// lastServed is the lease of the last operation dispatched from this
	// queue (or the level's when it was created): the round-robin clock.
	lastServed uint64
}

func (q *invQueue) before(r *invQueue) bool {
	if q.lastServed != r.lastServed {
		return q.lastServed < r.lastServed
	}
	return q.ops[0].seq < r.ops[0].seq
}

func (q *invQueue) setIndex(i int) { q.index = i }

// entry is a queued operation in an invocation queue. It holds the
// sequence number, so that ordering does not touch the operations.
type entry struct {
	seq uint64
	op  *operation
	gen uint32 // op.gen when queued
}

func (e entry) before(f entry) bool { return e.seq < f.seq }
func (e entry) setIndex(int)        {}

// valid reports whether e is not stale.
func (q *invQueue) valid(e entry) bool { return e.op.inv == q && e.op.gen == e.gen }

// trim drops the stale entries at the top, or all of them when they are
// most of the heap.
func (q *invQueue) trim() {
	if len(q.ops) > 2*q.live+64 {
		n := 0
		for _, e := range q.ops {
			if q.valid(e) {
				q.ops[n] = e
				n++
			}
		}
		clear(q.ops[n:])
		q.ops = q.ops[:n]
		q.ops.init()
		return
	}
	for len(q.ops) > 0 && !q.valid(q.ops[0]) {
		q.ops.remove(0)
	}
}

// head returns the operation the group would dispatch next.
func (g *group) head() *operation {
	return g.sorted[0].order[0].ops[0].op
}

// pick returns the matching worker with the most free slots, the first by
// id among equals. The group must have free slots.
func (g *group) pick() *worker {
	var best *worker
	n := 0
	for _, w := range g.workers {
		if f := w.free(); f > n {
			best, n = w, f
		}
	}
	return best
}

// groupFor returns the group of platform, creating it if needed.
func (s *State) groupFor(platform []*schedulerpb.Property) *group {
	s.reqBuf, s.keyBuf = s.requirements(platform, s.reqBuf[:0], s.keyBuf[:0])
	if g, ok := s.groups[string(s.keyBuf)]; ok {
		return g
	}
	g := &group{key: string(s.keyBuf), reqs: slices.Clone(s.reqBuf), levels: make(map[int32]*level)}
	for _, w := range s.workers {
		if w.offers.satisfy(g.reqs) {
			s.join(w, g)
		}
	}
	s.groups[g.key] = g
	return g
}

// join records that w matches g.
func (s *State) join(w *worker, g *group) {
	g.workers = insertSorted(g.workers, w, workerID)
	g.free += w.free()
	w.groups = append(w.groups, g)
}

// leaveGroups removes w from all its groups.
func (s *State) leaveGroups(w *worker) {
	f := w.free()
	for _, g := range w.groups {
		g.workers = removeSorted(g.workers, w.id, workerID)
		g.free -= f
	}
	w.groups = nil
}

// joinGroups adds w to every existing group it matches.
func (s *State) joinGroups(w *worker) {
	for _, g := range s.groups {
		if w.offers.satisfy(g.reqs) {
			s.join(w, g)
		}
	}
}

func workerID(w *worker) string    { return w.id }
func groupKey(g *group) string     { return g.key }
func levelPriority(l *level) int32 { return l.priority }

// queue puts op, whose stage must be QUEUED, in its queue.
func (s *State) queue(op *operation) {
	g := s.groupFor(op.platform)
	l := g.levels[op.priority]
	if l == nil {
		l = &level{priority: op.priority, group: g, invs: make(map[string]*invQueue)}
		g.levels[op.priority] = l
		g.sorted = insertSorted(g.sorted, l, levelPriority)
	}
	op.gen++
	e := entry{seq: op.seq, op: op, gen: op.gen}
	q := l.invs[op.invocation]
	if q == nil {
		q = &invQueue{id: op.invocation, level: l, lastServed: l.lastServed}
		l.invs[op.invocation] = q
		q.ops.push(e)
		l.order.push(q)
	} else {
		q.ops.push(e)
		l.order.fix(q.index)
	}
	q.live++
	op.inv = q
	g.queued++
	if g.queued == 1 {
		s.busy = insertSorted(s.busy, g, groupKey)
	}
	s.queued[op.priority]++
}

// unqueue takes the queued op out of its queue.
func (s *State) unqueue(op *operation) {
	q := op.inv
	l := q.level
	g := l.group
	op.inv = nil
	if q.live--; q.live > 0 {
		q.trim()
		l.order.fix(q.index)
	} else {
		l.order.remove(q.index)
		delete(l.invs, q.id)
		if len(l.order) == 0 {
			delete(g.levels, l.priority)
			g.sorted = removeSorted(g.sorted, l.priority, levelPriority)
		}
	}
	g.queued--
	if g.queued == 0 {
		s.busy = removeSorted(s.busy, g.key, groupKey)
	}
	if s.queued[op.priority]--; s.queued[op.priority] == 0 {
		delete(s.queued, op.priority)
	}
}

// dispatch assigns queued operations to workers with free slots until no
// group has both.
func (s *State) dispatch() {
	for {
		var best *operation
		var bg *group
		for _, g := range s.busy {
			if g.free == 0 {
				continue
			}
			if h := g.head(); best == nil || h.first(best) {
				best, bg = h, g
			}
		}
		if best == nil {
			return
		}
		s.assign(best, bg.pick())
	}
}

// assign leases the queued op to w.
func (s *State) assign(op *operation, w *worker) {
	lease := s.nextLease
	s.nextLease++
	op.inv.lastServed = lease
	op.inv.level.lastServed = lease
	s.unqueue(op)
	op.stage = schedulerpb.Stage_STAGE_EXECUTING
	op.attempts++
	op.startedAt = s.clock
	s.lease(op, w, lease)
	s.resp.Assignments = append(s.resp.Assignments, Assignment{
		Operation:      op.name,
		Worker:         w.id,
		Lease:          lease,
		Attempt:        op.attempts,
		Instance:       op.key.instance,
		DigestFunction: op.key.fn,
		ActionDigest:   op.digest,
		Priority:       op.priority,
		QueuedUnixNano: op.queuedAt,
	})
}

// lease records that op runs on w under lease.
func (s *State) lease(op *operation, w *worker, lease uint64) {
	before := w.free()
	op.next = w.leases
	if op.next != nil {
		op.next.prev = op
	}
	w.leases = op
	w.running++
	s.adjust(w, before)
	op.worker, op.lease = w, lease
}

// release ends the lease of the executing op, freeing its slot, and
// returns the worker it ran on.
func (s *State) release(op *operation) *worker {
	w := op.worker
	before := w.free()
	if op.prev != nil {
		op.prev.next = op.next
	} else {
		w.leases = op.next
	}
	if op.next != nil {
		op.next.prev = op.prev
	}
	op.prev, op.next = nil, nil
	w.running--
	s.adjust(w, before)
	op.worker, op.lease = nil, 0
	return w
}

// heap is a binary min-heap of items that track their index in it.
type heap[T interface {
	before(T) bool
	setIndex(int)
}] []T

func (h *heap[T]) push(x T) {
	*h = append(*h, x)
	x.setIndex(len(*h) - 1)
	h.up(len(*h) - 1)
}

// remove removes the item at index i.
func (h *heap[T]) remove(i int) {
	n := len(*h) - 1
	x := (*h)[i]
	if i != n {
		h.swap(i, n)
	}
	var zero T
	(*h)[n] = zero
	*h = (*h)[:n]
	x.setIndex(-1)
	if i != n {
		h.fix(i)
	}
}

// init establishes the heap order.
func (h heap[T]) init() {
	for i := len(h)/2 - 1; i >= 0; i-- {
		h.down(i)
	}
}

// fix restores the order after the item at index i changed.
func (h heap[T]) fix(i int) {
	if !h.down(i) {
		h.up(i)
	}
}

func (h heap[T]) swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].setIndex(i)
	h[j].setIndex(j)
}

func (h heap[T]) up(j int) {
	for j > 0 {
		i := (j - 1) / 2
		if !h[j].before(h[i]) {
			break
		}
		h.swap(i, j)
		j = i
	}
}

func (h heap[T]) down(i0 int) bool {
	i, n := i0, len(h)
	for {
		j := 2*i + 1
		if j >= n {
			break
		}
		if r := j + 1; r < n && h[r].before(h[j]) {
			j = r
		}
		if !h[j].before(h[i]) {
			break
		}
		h.swap(i, j)
		i = j
	}
	return i > i0
}
