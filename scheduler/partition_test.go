package scheduler_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// network carries the raft traffic of a test cluster: every node dials
// the others through a loopback TCP relay per ordered pair of nodes
// (from, to), so that the test can cut a node off, in both directions,
// and heal it. Only raft goes through it; gRPC (clients, workers,
// forwarding) does not.
type network struct {
	t      *testing.T
	c      *cluster
	mu     sync.Mutex
	relays map[[2]string]*relay
	cut    map[string]bool
}

// partitionable makes c's nodes, started after this call, route raft
// through relays.
func partitionable(c *cluster) *network {
	nw := &network{t: c.t, c: c, relays: map[[2]string]*relay{}, cut: map[string]bool{}}
	c.net = nw
	c.t.Cleanup(func() {
		nw.mu.Lock()
		defer nw.mu.Unlock()
		for _, r := range nw.relays {
			r.close()
		}
	})
	return nw
}

// dialer is node from's raft dialer: the relay (from, to) for the raft
// address of node to.
func (nw *network) dialer(from string) func(string, time.Duration) (net.Conn, error) {
	return func(addr string, timeout time.Duration) (net.Conn, error) {
		r, err := nw.relay(from, addr)
		if err != nil {
			return nil, err
		}
		return net.DialTimeout("tcp", r.addr(), timeout)
	}
}

func (nw *network) relay(from, addr string) (*relay, error) {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	to := ""
	for id, a := range nw.c.raft {
		if a == addr {
			to = id
		}
	}
	if to == "" {
		return nil, fmt.Errorf("no node at %s", addr)
	}
	key := [2]string{from, to}
	r := nw.relays[key]
	if r == nil {
		var err error
		if r, err = newRelay(addr); err != nil {
			return nil, err
		}
		r.set(nw.cut[from] || nw.cut[to])
		nw.relays[key] = r
	}
	return r, nil
}

// isolate cuts node id off from every other node (cut true) or heals it.
func (nw *network) isolate(id string, cut bool) {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	nw.cut[id] = cut
	for key, r := range nw.relays {
		r.set(nw.cut[key[0]] || nw.cut[key[1]])
	}
}

// relay forwards TCP connections to target. While cut, it closes the
// connections it carries and every new one at once.
type relay struct {
	lis    net.Listener
	target string

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
}

func newRelay(target string) (*relay, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &relay{lis: lis, target: target, conns: map[net.Conn]struct{}{}}
	go r.serve()
	return r, nil
}

func (r *relay) addr() string { return r.lis.Addr().String() }

func (r *relay) serve() {
	for {
		c, err := r.lis.Accept()
		if err != nil {
			return
		}
		go r.pipe(c)
	}
}

// track adds conns to the carried connections, unless the relay is cut.
func (r *relay) track(conns ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cut {
		return false
	}
	for _, c := range conns {
		r.conns[c] = struct{}{}
	}
	return true
}

func (r *relay) untrack(conns ...net.Conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range conns {
		delete(r.conns, c)
		c.Close()
	}
}

func (r *relay) pipe(in net.Conn) {
	if !r.track(in) {
		in.Close()
		return
	}
	out, err := net.DialTimeout("tcp", r.target, time.Second)
	if err != nil {
		r.untrack(in)
		return
	}
	if !r.track(out) {
		r.untrack(in, out)
		return
	}
	done := make(chan struct{})
	go func() {
		io.Copy(out, in)
		close(done)
	}()
	io.Copy(in, out)
	r.untrack(in, out) // ends the other copy
	<-done
}

func (r *relay) set(cut bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cut = cut
	if cut {
		for c := range r.conns {
			c.Close()
		}
		clear(r.conns)
	}
}

func (r *relay) close() {
	r.lis.Close()
	r.set(true)
}

// run executes actions first..first+n-1 through conn, concurrently, and
// returns their operation names once all have completed successfully.
func (c *cluster) run(ctx context.Context, conn *grpc.ClientConn, first, n int) []string {
	c.t.Helper()
	names := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		ad := c.action(first + i)
		wg.Go(func() {
			name, resp, err := await(ctx, conn, ad)
			switch {
			case err != nil:
				errs[i] = err
			case resp.Status.GetCode() != 0 || resp.Result == nil:
				errs[i] = fmt.Errorf("%v", resp)
			}
			names[i] = name
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			c.t.Fatalf("action %d: %v", first+i, err)
		}
	}
	return names
}

// waitFor polls cond until it holds, for at most d, and returns how long
// it took.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

// caughtUp reports whether raft on node id has handed its state every
// entry that of node leader has (the states themselves may lag a
// little: see checkCompleted).
func (c *cluster) caughtUp(id, leader string) bool {
	return c.nodes[id].n.Stats().AppliedIndex >= c.nodes[leader].n.Stats().AppliedIndex
}

// checkCompleted fails the test unless node id's own state (not the
// leader's, via forwarding) has, within a few seconds, every operation of
// names completed.
func (c *cluster) checkCompleted(id string, names []string) {
	c.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, name := range names {
		for {
			op, err := c.nodes[id].ex.GetOperation(context.Background(), &longrunningpb.GetOperationRequest{Name: name})
			if err == nil && op.Done {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("%s's state: operation %s: %v %v", id, name, op, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// checkUnknown fails the test if node id's own state knows any of the
// operations names: it is really cut off.
func (c *cluster) checkUnknown(id string, names []string) {
	c.t.Helper()
	c.nodes[id].n.Read(func(s *stateT) {
		for _, name := range names {
			if _, ok := s.Operation(name); ok {
				c.t.Errorf("%s, cut off, knows %s", id, name)
			}
		}
	})
}

// checkNotStale asks node id over gRPC for operations that completed:
// it must answer UNAVAILABLE or with the completed operation, never with
// what its own, stale, state holds.
func (c *cluster) checkNotStale(id string, names []string) (unavailable int) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ops := longrunningpb.NewOperationsClient(c.nodeConn(id))
	for _, name := range names {
		op, err := ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: name})
		switch {
		case status.Code(err) == codes.Unavailable:
			unavailable++
		case err != nil:
			c.t.Errorf("GetOperation %s on %s: %v", name, id, err)
		case !op.Done:
			c.t.Errorf("GetOperation %s on %s: stale answer %v", name, id, op)
		}
	}
	return unavailable
}

// checkRejectsWork fails the test unless node id, cut off, refuses an
// Execute with UNAVAILABLE.
func (c *cluster) checkRejectsWork(id string) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := repb.NewExecutionClient(c.nodeConn(id)).Execute(ctx, &repb.ExecuteRequest{ActionDigest: c.action(1 << 20), SkipCacheLookup: true})
	if err == nil {
		var op *longrunningpb.Operation
		op, err = stream.Recv()
		if err == nil {
			c.t.Errorf("%s accepted an Execute while cut off: %v", id, op)
		}
	}
	if status.Code(err) != codes.Unavailable {
		c.t.Errorf("Execute on %s: %v, want UNAVAILABLE", id, err)
	}
}

// TestPartition cuts nodes off the raft network of a 3-node cluster
// (their relays close every connection and refuse new ones) and heals
// them.
func TestPartition(t *testing.T) {
	// A follower cut off: the majority commits without it, it serves
	// nothing stale, it does not disturb the leader when it comes back
	// (pre-vote: its pre-votes fail, so its term stays), and it catches
	// up.
	t.Run("follower", func(t *testing.T) {
		c := emptyCluster(t)
		nw := partitionable(c)
		for i := range 3 {
			c.add(fmt.Sprintf("node%d", i+1), bootAll)
		}
		for _, id := range c.ids {
			c.start(id)
		}
		leader := c.waitLeader()
		var follower, other string
		for _, id := range c.ids {
			switch {
			case id == leader:
			case follower == "":
				follower = id
			default:
				other = id
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		majority := c.connTo(leader, other)
		r := &runner{delay: 5 * time.Millisecond, slots: 8, runs: map[string]int{}}
		defer startWorker(majority, "w", r)()
		before := c.run(ctx, majority, 0, 10)
		st := c.nodes[leader].n.Stats()

		cutAt := time.Now()
		nw.isolate(follower, true)
		// The follower notices when the leader's heartbeats stop.
		noticed := waitFor(t, 10*time.Second, "the follower noticing", func() bool {
			id, _ := c.nodes[follower].n.Leader()
			return id == ""
		})
		during := c.run(ctx, majority, 100, 30)
		committed := time.Since(cutAt)
		c.checkUnknown(follower, during)
		unavailable := c.checkNotStale(follower, append(before, during...))
		c.checkRejectsWork(follower)
		// Stay cut off for several election timeouts: a follower that
		// bumped its term on each would come back with a higher one.
		time.Sleep(time.Until(cutAt.Add(3 * time.Second)))
		fst := c.nodes[follower].n.Stats()
		if fst.Term != st.Term || fst.State == "Leader" {
			t.Errorf("cut-off follower: term %d state %s; the leader's term was %d", fst.Term, fst.State, st.Term)
		}
		if lst := c.nodes[leader].n.Stats(); lst.Leader != leader || lst.Term != st.Term {
			t.Errorf("the majority was disturbed: leader %s term %d, was %s term %d", lst.Leader, lst.Term, leader, st.Term)
		}

		nw.isolate(follower, false)
		caughtUp := waitFor(t, 30*time.Second, "the follower catching up", func() bool { return c.caughtUp(follower, leader) })
		c.checkCompleted(follower, during)
		// It follows the leader again, and never disturbed it.
		waitFor(t, 5*time.Second, "the follower following", func() bool {
			id, _ := c.nodes[follower].n.Leader()
			return id == leader
		})
		time.Sleep(time.Second)
		if lst := c.nodes[leader].n.Stats(); lst.Leader != leader || lst.Term != st.Term {
			t.Errorf("the healed follower disturbed the leader: leader %s term %d, was %s term %d", lst.Leader, lst.Term, leader, st.Term)
		}
		if n := c.checkNotStale(follower, during[:1]); n != 0 {
			t.Error("the healed follower does not forward to the leader")
		}
		more := c.run(ctx, c.conn(), 200, 5)
		waitFor(t, 10*time.Second, "the follower applying new work", func() bool { return c.caughtUp(follower, leader) })
		c.checkCompleted(follower, more)
		t.Logf("follower %s cut off: noticed after %v; the majority completed %d actions within %v; "+
			"%d/%d queries to the follower were UNAVAILABLE, none stale; term stayed %d; caught up %v after healing",
			follower, noticed.Round(time.Millisecond), len(during), committed.Round(time.Millisecond),
			unavailable, len(before)+len(during), st.Term, caughtUp.Round(time.Millisecond))
	})

	// The leader cut off: the others elect a new leader and go on, the
	// old leader steps down, and no operation is lost: those in flight
	// at the cut complete, each action runs once.
	t.Run("leader", func(t *testing.T) {
		c := emptyCluster(t)
		nw := partitionable(c)
		for i := range 3 {
			c.add(fmt.Sprintf("node%d", i+1), bootAll)
		}
		for _, id := range c.ids {
			c.start(id)
		}
		old := c.waitLeader()
		var rest []string
		for _, id := range c.ids {
			if id != old {
				rest = append(rest, id)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		// Clients and the worker reach the leader through a follower
		// that stays in the majority.
		majority := c.connTo(rest...)
		r := &runner{delay: 500 * time.Millisecond, slots: 4, runs: map[string]int{}}
		defer startWorker(majority, "w", r)()
		before := c.run(ctx, majority, 0, 4)
		// 12 actions in flight at the cut: 4 executing, 8 queued.
		var wg sync.WaitGroup
		var inflight []string
		wg.Go(func() { inflight = c.run(ctx, majority, 100, 12) })
		waitFor(t, 10*time.Second, "4 actions executing", func() bool { return total(r) >= 8 })
		oldTerm := c.nodes[old].n.Stats().Term

		cutAt := time.Now()
		nw.isolate(old, true)
		steppedDown := waitFor(t, 10*time.Second, "the old leader stepping down", func() bool { return !c.nodes[old].n.IsLeader() })
		leader := c.waitLeaderAmong(rest...)
		elected := time.Since(cutAt)
		during := c.run(ctx, majority, 200, 10)
		wg.Wait()
		completed := time.Since(cutAt)
		if c.nodes[old].n.IsLeader() {
			t.Error("the cut-off leader leads again")
		}
		newTerm := c.nodes[leader].n.Stats().Term
		if newTerm <= oldTerm {
			t.Errorf("new leader's term %d, old %d", newTerm, oldTerm)
		}
		c.checkUnknown(old, during)
		unavailable := c.checkNotStale(old, append(inflight, during...))
		c.checkRejectsWork(old)
		for i := range 12 {
			if n := r.count(c.action(100 + i).Hash); n != 1 {
				t.Errorf("in-flight action %d ran %d times", i, n)
			}
		}

		nw.isolate(old, false)
		caughtUp := waitFor(t, 30*time.Second, "the old leader catching up", func() bool { return c.caughtUp(old, leader) })
		c.checkCompleted(old, append(append(before, inflight...), during...))
		time.Sleep(time.Second)
		if st := c.nodes[leader].n.Stats(); st.Leader != leader || st.Term != newTerm {
			t.Errorf("the healed old leader disturbed the new one: leader %s term %d, was %s term %d", st.Leader, st.Term, leader, newTerm)
		}
		t.Logf("leader %s (term %d) cut off: it stepped down after %v; %s leads (term %d) after %v; "+
			"the 12 actions in flight and %d new ones completed within %v; %d/%d queries to the old leader were UNAVAILABLE, none stale; "+
			"it caught up %v after healing",
			old, oldTerm, steppedDown.Round(time.Millisecond), leader, newTerm, elected.Round(time.Millisecond),
			len(during), completed.Round(time.Millisecond), unavailable, len(inflight)+len(during), caughtUp.Round(time.Millisecond))
	})
}
