package scheduler_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/executor"
	"tvixfarm/executor/worker"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	workerpb "tvixfarm/proto/tvixfarm/worker/v1"
	"tvixfarm/scheduler"
	"tvixfarm/scheduler/state"
)

type stateT = state.State

const stageCompleted = schedulerpb.Stage_STAGE_COMPLETED

// cluster is a scheduler cluster of in-process nodes that talk raft and
// gRPC over loopback, sharing one in-memory storage.
type cluster struct {
	t      *testing.T
	dir    string
	stores *blobstore.Instances
	ids    []string
	raft   map[string]string // id -> raft address
	client map[string]string // id -> gRPC address
	nodes  map[string]*testNode
	// boot is how each node starts: bootAll (default), bootSolo or
	// bootJoin.
	boot map[string]bootMode
	// net, if set, carries raft's traffic (see network).
	net *network
}

// bootMode is how a node of a test cluster starts from an empty
// directory.
type bootMode int

const (
	// bootAll bootstraps a cluster of every node of the test cluster.
	bootAll bootMode = iota
	// bootSolo bootstraps a cluster of the node alone.
	bootSolo
	// bootJoin does not bootstrap: the node waits to be added.
	bootJoin
)

type testNode struct {
	n      *scheduler.Node
	ex     *scheduler.Execution
	srv    *grpc.Server
	cancel context.CancelFunc
	fwd    *scheduler.Forwarder
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// quiet is the nodes' and workers' logger: silent, unless
// TVIXFARM_TEST_LOG is set, then Info and above on standard error (to
// follow a failover, say).
func quiet() *slog.Logger {
	if os.Getenv("TVIXFARM_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newCluster starts n nodes that bootstrap one cluster.
func newCluster(t *testing.T, n int) *cluster {
	c := emptyCluster(t)
	for i := range n {
		c.add(fmt.Sprintf("node%d", i+1), bootAll)
	}
	for _, id := range c.ids {
		c.start(id)
	}
	c.waitLeader()
	return c
}

// emptyCluster returns a cluster without nodes; add adds them.
func emptyCluster(t *testing.T) *cluster {
	c := &cluster{t: t, dir: t.TempDir(), raft: map[string]string{}, client: map[string]string{}, nodes: map[string]*testNode{},
		boot:   map[string]bootMode{},
		stores: &blobstore.Instances{Default: blobstore.Stores{CAS: blobstore.NewMemory(blobstore.CAS, 1<<30), AC: blobstore.NewMemory(blobstore.AC, 1<<30)}}}
	t.Cleanup(func() {
		for _, id := range c.ids {
			c.stop(id)
		}
	})
	return c
}

// add gives node id its addresses; start starts it.
func (c *cluster) add(id string, boot bootMode) {
	c.ids = append(c.ids, id)
	c.raft[id], c.client[id] = freeAddr(c.t), freeAddr(c.t)
	c.boot[id] = boot
}

// start starts node id (again) from its directory.
func (c *cluster) start(id string) {
	var peers []scheduler.Peer
	for _, p := range c.ids {
		if c.boot[p] == bootAll {
			peers = append(peers, scheduler.Peer{ID: p, Raft: c.raft[p]})
		}
	}
	cfg := scheduler.NodeConfig{ID: id, RaftAddr: c.raft[id], ClientAddr: c.client[id],
		Dir: filepath.Join(c.dir, id), Bootstrap: c.boot[id] != bootJoin, Peers: peers, Logger: quiet()}
	if c.boot[id] == bootSolo {
		cfg.Peers = nil
	}
	if c.net != nil {
		cfg.RaftDial = c.net.dialer(id)
	}
	n, err := scheduler.NewNode(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ws := scheduler.NewWorkers(ctx, n, c.stores, scheduler.WorkersConfig{HeartbeatInterval: 200 * time.Millisecond,
		WorkerTimeout: time.Second, PlatformGrace: time.Minute, Logger: quiet()})
	ex := scheduler.NewExecution(n, c.stores, ws, scheduler.ExecutionConfig{PlatformGrace: time.Minute, Logger: quiet()})
	fwd := scheduler.NewForwarder(n)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(fwd.UnaryInterceptor()), grpc.ChainStreamInterceptor(fwd.StreamInterceptor()))
	repb.RegisterExecutionServer(srv, ex)
	longrunningpb.RegisterOperationsServer(srv, ex)
	workerpb.RegisterWorkersServer(srv, ws)
	adminpb.RegisterClusterServer(srv, scheduler.NewCluster(n, ws))
	schedulerpb.RegisterLeaderServer(srv, fwd)
	var lis net.Listener
	for i := 0; ; i++ {
		if lis, err = net.Listen("tcp", c.client[id]); err == nil || i > 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	go srv.Serve(lis)
	c.nodes[id] = &testNode{n: n, ex: ex, srv: srv, cancel: cancel, fwd: fwd}
}

// stop kills node id abruptly: connections drop, raft shuts down.
func (c *cluster) stop(id string) {
	tn := c.nodes[id]
	if tn == nil {
		return
	}
	delete(c.nodes, id)
	tn.srv.Stop()
	tn.cancel()
	tn.fwd.Close()
	tn.n.Close()
}

// waitLeader waits for a leader among the running nodes and returns it.
func (c *cluster) waitLeader() string {
	var ids []string
	for id := range c.nodes {
		ids = append(ids, id)
	}
	return c.waitLeaderAmong(ids...)
}

// waitLeaderAmong waits until one of the nodes ids leads and every one of
// them knows it, with its client address (so they can forward to it).
func (c *cluster) waitLeaderAmong(ids ...string) string {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		for _, id := range ids {
			if tn := c.nodes[id]; tn == nil || !tn.n.IsLeader() {
				continue
			}
			known := true
			for _, o := range ids {
				if lid, addr := c.nodes[o].n.Leader(); lid != id || addr == "" {
					known = false
				}
			}
			if known {
				return id
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.t.Fatalf("no leader among %v within 20 s", ids)
	return ""
}

// conn connects to every node: pick_first moves to another node when the
// one in use dies.
func (c *cluster) conn() *grpc.ClientConn { return c.connTo(c.ids...) }

// workerConn is conn as an executor dials it.
func (c *cluster) workerConn() *grpc.ClientConn { return c.connWith(worker.DialOptions(), c.ids...) }

// connTo connects to the nodes ids, the first one first.
func (c *cluster) connTo(ids ...string) *grpc.ClientConn { return c.connWith(nil, ids...) }

// connWith is connTo with extra dial options.
func (c *cluster) connWith(opts []grpc.DialOption, ids ...string) *grpc.ClientConn {
	r := manual.NewBuilderWithScheme(fmt.Sprintf("tf%d", time.Now().UnixNano()))
	var addrs []resolver.Address
	for _, id := range ids {
		addrs = append(addrs, resolver.Address{Addr: c.client[id]})
	}
	r.InitialState(resolver.State{Addresses: addrs})
	conn, err := grpc.NewClient(r.Scheme()+":///cluster", append(opts, grpc.WithResolvers(r), grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { conn.Close() })
	return conn
}

// nodeConn connects to one node.
func (c *cluster) nodeConn(id string) *grpc.ClientConn {
	conn, err := grpc.NewClient(c.client[id], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { conn.Close() })
	return conn
}

// action stores a unique action and returns its digest.
func (c *cluster) action(i int) *repb.Digest { return c.actionCache(i, false) }

// actionCache stores a unique action, cacheable or not.
func (c *cluster) actionCache(i int, cacheable bool) *repb.Digest {
	cmd, _ := proto.Marshal(&repb.Command{Arguments: []string{"/bin/true", fmt.Sprint(i)}})
	cd := digest.Compute(digest.SHA256, cmd)
	a, _ := proto.Marshal(&repb.Action{CommandDigest: cd.Proto(), InputRootDigest: digest.Empty(digest.SHA256).Proto(), DoNotCache: !cacheable,
		Platform: &repb.Platform{Properties: []*repb.Platform_Property{{Name: "OSFamily", Value: "linux"}}}})
	ad := digest.Compute(digest.SHA256, a)
	ctx := context.Background()
	blobstore.PutBytes(ctx, c.stores.Default.CAS, cd, cmd)
	blobstore.PutBytes(ctx, c.stores.Default.CAS, ad, a)
	return ad.Proto()
}

// runner counts the executions of each action and takes delay per action.
type runner struct {
	delay time.Duration
	slots int
	mu    sync.Mutex
	runs  map[string]int
	first chan time.Time // receives the start time of each run, if set
}

func (r *runner) Execute(ctx context.Context, req *executor.Request) (*repb.ExecuteResponse, error) {
	r.mu.Lock()
	r.runs[req.Action.Hex()]++
	r.mu.Unlock()
	if r.first != nil {
		select {
		case r.first <- time.Now():
		default:
		}
	}
	select {
	case <-time.After(r.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &repb.ExecuteResponse{Result: &repb.ActionResult{ExitCode: 0}}, nil
}

func (r *runner) Platform() *repb.Platform {
	return &repb.Platform{Properties: []*repb.Platform_Property{{Name: "OSFamily", Value: "linux"}}}
}
func (r *runner) Slots() int { return r.slots }

func (r *runner) count(hash string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.runs[hash]
}

// startWorker runs a worker until the returned function is called.
func startWorker(conn *grpc.ClientConn, id string, r worker.Runner) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		worker.New(conn, r, worker.Config{ID: id, Logger: quiet()}).Run(ctx)
	}()
	return func() { cancel(); <-done }
}

// await runs Execute for ad, resuming with WaitExecution on whichever
// node answers when the stream breaks, until the operation completes.
func await(ctx context.Context, conn *grpc.ClientConn, ad *repb.Digest) (string, *repb.ExecuteResponse, error) {
	ex := repb.NewExecutionClient(conn)
	name := ""
	var last error
	for ctx.Err() == nil {
		var stream grpc.ServerStreamingClient[longrunningpb.Operation]
		var err error
		if name == "" {
			stream, err = ex.Execute(ctx, &repb.ExecuteRequest{ActionDigest: ad}, grpc.WaitForReady(true))
		} else {
			stream, err = ex.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: name}, grpc.WaitForReady(true))
		}
		for err == nil {
			var op *longrunningpb.Operation
			if op, err = stream.Recv(); err != nil {
				break
			}
			name = op.Name
			if op.Done {
				resp := &repb.ExecuteResponse{}
				if err := op.GetResponse().UnmarshalTo(resp); err != nil {
					return name, nil, err
				}
				return name, resp, nil
			}
		}
		last = err
		time.Sleep(50 * time.Millisecond)
	}
	return name, nil, fmt.Errorf("%v (last error: %v)", ctx.Err(), last)
}

// TestLeaderFailover kills the leader while 1,000 actions are in flight:
// every action completes, each runs exactly once (no worker dies), and
// the time until the new leader dispatches again is reported.
func TestLeaderFailover(t *testing.T) {
	c := newCluster(t, 3)
	r1 := &runner{delay: 20 * time.Millisecond, slots: 16, runs: map[string]int{}, first: make(chan time.Time, 1)}
	r2 := &runner{delay: 20 * time.Millisecond, slots: 16, runs: map[string]int{}, first: make(chan time.Time, 1)}
	defer startWorker(c.workerConn(), "w1", r1)()
	defer startWorker(c.workerConn(), "w2", r2)()

	const n = 1000
	ads := make([]*repb.Digest, n)
	for i := range ads {
		// Cacheable: a client whose stream broke before it learned the
		// operation's name executes again, and finds the result cached
		// if the action completed meanwhile.
		ads[i] = c.actionCache(i, true)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	conn := c.conn()
	var done atomic.Int64
	errs := make(chan error, n)
	names := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			name, resp, err := await(ctx, conn, ads[i])
			names[i] = name
			switch {
			case err != nil:
				errs <- fmt.Errorf("action %d: %v", i, err)
			case resp.Status.GetCode() != 0 || resp.Result == nil:
				errs <- fmt.Errorf("action %d: %v", i, resp)
			}
			done.Add(1)
		})
	}
	// Kill the leader once some actions have completed and most are in
	// flight.
	for done.Load() < 100 {
		time.Sleep(time.Millisecond)
	}
	leader := c.waitLeader()
	killed := time.Now()
	c.stop(leader)
	inflight := n - done.Load()
	// Drain what was dispatched before the kill was noticed.
	time.Sleep(10 * time.Millisecond)
	for _, ch := range []chan time.Time{r1.first, r2.first} {
		select {
		case <-ch:
		default:
		}
	}
	newLeader := c.waitLeader()
	elected := time.Since(killed)
	var resumed time.Time
	select {
	case resumed = <-r1.first:
	case resumed = <-r2.first:
	case <-time.After(30 * time.Second):
		t.Fatal("no dispatch within 30 s of the leader's death")
	}
	t.Logf("killed leader %s with %d of %d actions not completed; %s leads (seen %v after the kill); dispatch resumed %v after the kill",
		leader, inflight, n, newLeader, elected.Round(time.Millisecond), resumed.Sub(killed).Round(time.Millisecond))
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i, ad := range ads {
		if runs := r1.count(ad.Hash) + r2.count(ad.Hash); runs != 1 {
			t.Errorf("action %d (%s) ran %d times", i, names[i], runs)
		}
	}
}

// TestExecutorDies kills a worker mid-action: its actions are requeued
// and completed by the other.
func TestExecutorDies(t *testing.T) {
	c := newCluster(t, 3)
	slow := &runner{delay: time.Hour, slots: 4, runs: map[string]int{}}
	stopSlow := startWorker(c.workerConn(), "slow", slow)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn := c.conn()
	var wg sync.WaitGroup
	results := make([]*repb.ExecuteResponse, 4)
	for i := range results {
		ad := c.action(i)
		wg.Go(func() {
			_, results[i], _ = await(ctx, conn, ad)
		})
	}
	deadline := time.Now().Add(20 * time.Second)
	for total(slow) < 4 {
		if time.Now().After(deadline) {
			t.Fatal("the slow worker did not get the 4 actions")
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopSlow() // it dies mid-action
	fast := &runner{delay: time.Millisecond, slots: 4, runs: map[string]int{}}
	defer startWorker(c.workerConn(), "fast", fast)()
	wg.Wait()
	for i, r := range results {
		if r.GetStatus().GetCode() != 0 || r.Result == nil {
			t.Errorf("action %d: %v", i, r)
		}
	}
	if total(fast) != 4 {
		t.Errorf("the other worker ran %d actions, want 4", total(fast))
	}
}

func total(r *runner) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, v := range r.runs {
		n += v
	}
	return n
}

// TestRestartFromDisk stops every node with work queued and restarts them
// from their directories: the queued work resumes and completes, and
// clients find their operations by name. A follower that was down while
// work completed catches up.
func TestRestartFromDisk(t *testing.T) {
	c := newCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := c.conn()
	// Queue 20 actions with no worker connected.
	names := make([]string, 20)
	for i := range names {
		stream, err := repb.NewExecutionClient(conn).Execute(ctx, &repb.ExecuteRequest{ActionDigest: c.action(i), SkipCacheLookup: true}, grpc.WaitForReady(true))
		if err != nil {
			t.Fatal(err)
		}
		op, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		names[i] = op.Name
	}
	// Cut a follower off (stopped), while the others work on.
	leader := c.waitLeader()
	follower := c.ids[0]
	if follower == leader {
		follower = c.ids[1]
	}
	c.stop(follower)
	for _, id := range c.ids {
		c.stop(id)
	}
	// Restart all but the follower: the queue is still there.
	for _, id := range c.ids {
		if id != follower {
			c.start(id)
		}
	}
	c.waitLeader()
	r := &runner{delay: time.Millisecond, slots: 8, runs: map[string]int{}}
	defer startWorker(c.workerConn(), "w", r)()
	for i, name := range names {
		stream, err := repb.NewExecutionClient(conn).WaitExecution(ctx, &repb.WaitExecutionRequest{Name: name}, grpc.WaitForReady(true))
		if err != nil {
			t.Fatal(err)
		}
		for {
			op, err := stream.Recv()
			if err != nil {
				t.Fatalf("operation %d: %v", i, err)
			}
			if op.Done {
				break
			}
		}
	}
	if total(r) != len(names) {
		t.Errorf("%d runs for %d queued actions", total(r), len(names))
	}
	// Heal the follower: it catches up with the completed operations.
	c.start(follower)
	deadline := time.Now().Add(20 * time.Second)
	for {
		completed := 0
		c.nodes[follower].n.Read(func(s *stateT) {
			for _, name := range names {
				if op, ok := s.Operation(name); ok && op.Stage == stageCompleted {
					completed++
				}
			}
		})
		if completed == len(names) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the healed follower knows %d of %d completions", completed, len(names))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDedupAcrossNodes submits one action on every node at once: it runs
// once, and every client gets its result.
func TestDedupAcrossNodes(t *testing.T) {
	c := newCluster(t, 3)
	r := &runner{delay: 200 * time.Millisecond, slots: 4, runs: map[string]int{}}
	defer startWorker(c.workerConn(), "w", r)()
	ad := c.action(42)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	names := make([]string, 0, 9)
	var mu sync.Mutex
	for range 3 {
		for _, id := range c.ids {
			conn := c.nodeConn(id)
			wg.Go(func() {
				name, resp, err := await(ctx, conn, ad)
				if err != nil || resp.Result == nil {
					t.Errorf("via %s: %v %v", id, resp, err)
				}
				mu.Lock()
				names = append(names, name)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if n := r.count(ad.Hash); n != 1 {
		t.Errorf("ran %d times", n)
	}
	for _, n := range names {
		if n != names[0] {
			t.Errorf("operations differ: %q", names)
			break
		}
	}
}

// TestCommitNudge checks that the leader of a cluster follows an entry
// committed on an idle log with a barrier, which carries the commit index
// to the followers at once (instead of after raft's CommitTimeout), that
// a barrier is not followed by another, and that a node alone adds none.
func TestCommitNudge(t *testing.T) {
	for _, size := range []int{3, 1} {
		c := newCluster(t, size)
		leader := c.nodes[c.waitLeader()].n
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		// Let the new leader's own entries settle.
		last := leader.Stats().LastIndex
		for settled := 0; settled < 5; {
			time.Sleep(20 * time.Millisecond)
			if now := leader.Stats().LastIndex; now != last {
				last, settled = now, 0
			} else {
				settled++
			}
		}
		if _, err := leader.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_Drain{Drain: &schedulerpb.Drain{Worker: "nobody"}}}); err != nil {
			t.Fatal(err)
		}
		want := last + 1 // the command's entry
		if size > 1 {
			want++ // and the barrier
		}
		waitFor(t, 5*time.Second, "the barrier", func() bool { return leader.Stats().LastIndex >= want })
		time.Sleep(50 * time.Millisecond)
		if got := leader.Stats().LastIndex; got != want {
			t.Errorf("%d nodes: log at index %d after one command at %d, want %d", size, got, last+1, want)
		}
	}
}

// TestApplyDuringElection: commands applied on the followers while no
// leader is known succeed once one is elected, also on the node that is
// elected. (Its batches, waiting for a leader to forward to, used to wait
// out electionWait and fail, and its own applies, such as the workers'
// registrations, queued behind them.)
func TestApplyDuringElection(t *testing.T) {
	c := newCluster(t, 3)
	c.stop(c.waitLeader())
	var survivors []*scheduler.Node
	for _, tn := range c.nodes {
		survivors = append(survivors, tn.n)
	}
	// Until they notice, the survivors forward to the dead leader, which
	// fails at once. The case here is the election: every survivor is a
	// candidate and knows no leader.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Microsecond) {
		if time.Now().After(deadline) {
			t.Skip("never saw all survivors without a leader (an election too quick to catch)")
		}
		all := true
		for _, n := range survivors {
			if id, _ := n.Leader(); id != "" || n.IsLeader() {
				all = false
			}
		}
		if all {
			break
		}
	}
	start := time.Now()
	var elected atomic.Int64 // when a survivor first led, after start
	go func() {
		for time.Since(start) < 10*time.Second {
			for _, n := range survivors {
				if n.IsLeader() {
					elected.Store(int64(time.Since(start)))
					return
				}
			}
			time.Sleep(time.Millisecond)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errs := make([]error, len(survivors))
	var wg sync.WaitGroup
	for i, n := range survivors {
		wg.Go(func() {
			_, errs[i] = n.Apply(ctx, &schedulerpb.Command{Command: &schedulerpb.Command_Drain{Drain: &schedulerpb.Drain{Worker: fmt.Sprint("w", i)}}})
		})
	}
	wg.Wait()
	leader := c.waitLeader()
	// A follower gives up waiting for a leader after 2 s (electionWait);
	// an election slower than that (a loaded machine) proves nothing.
	if e := time.Duration(elected.Load()); e == 0 || e > 1500*time.Millisecond {
		t.Skipf("the election took %v", e)
	}
	t.Logf("%s elected %v after the applies started, which took %v", leader, time.Duration(elected.Load()).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	for i, err := range errs {
		if err != nil {
			t.Errorf("apply on %s (leader now: %s): %v", survivors[i].ID(), leader, err)
		}
	}
}
