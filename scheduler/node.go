package scheduler

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftwal "github.com/hashicorp/raft-wal"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	"tvixfarm/scheduler/state"
)

// Peer is a member of the raft cluster.
type Peer struct {
	// ID names the node; Raft is its raft address (host:port).
	ID, Raft string
}

// NodeConfig configures a Node.
type NodeConfig struct {
	// ID names this node in the cluster (default: "node1").
	ID string
	// RaftAddr is the address raft listens on and advertises.
	RaftAddr string
	// ClientAddr is this node's gRPC address, which followers forward
	// calls to when this node leads.
	ClientAddr string
	// Dir holds the raft log, stable store and snapshots.
	Dir string
	// Bootstrap forms a new cluster of Peers (or of this node alone if
	// Peers is empty) when Dir holds no raft state. Nodes that join a
	// running cluster do not bootstrap.
	Bootstrap bool
	Peers     []Peer
	// State configures the state machine; every node must use the same.
	State state.Config
	// ApplyTimeout bounds one raft apply (default 10 s).
	ApplyTimeout time.Duration
	// SnapshotThreshold is the number of log entries between snapshots
	// (default 8192).
	SnapshotThreshold uint64
	// RaftDial, if set, opens raft's connections to other nodes instead
	// of plain TCP; raft still listens on RaftAddr. Tests route raft
	// traffic through relays with it, to cut the network.
	RaftDial func(address string, timeout time.Duration) (net.Conn, error)
	Logger   *slog.Logger
}

// Node is one scheduler replica: a raft node whose FSM is the scheduler
// state. Writes go through Apply, which batches the commands of
// concurrent callers into one log entry; reads go through Read.
type Node struct {
	cfg NodeConfig
	// fastStart: the node runs with fastStartTimeout until it leads
	// (set in NewNode, then only watchLeadership touches it).
	fastStart bool
	log       *slog.Logger
	fsm       *fsm
	raft      *raft.Raft
	trans     *raft.NetworkTransport
	store     *raftwal.WAL

	reqs   chan *applyReq
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	watchers map[string]map[*Watch]struct{}
	hooks    []func(*state.Response)
	// leading is closed when this node's leadership ends; nil while it
	// does not lead.
	leading chan struct{}
	// contact is closed when this node loses touch with the cluster: it
	// neither leads nor hears from a leader; nil while it is cut off.
	contact chan struct{}
	// remote applies a batch on the leader (see Forwarder); nil until a
	// Forwarder is attached.
	remote func(ctx context.Context, b *schedulerpb.Batch) ([]state.Result, uint64, error)
	// admit, if set, vets the commands that followers forward before
	// the leader applies them (see Execution.admit).
	admit func(*schedulerpb.Command) error
}

// applyReq is a caller's commands waiting to be batched.
type applyReq struct {
	cmds []*schedulerpb.Command
	done chan applyResult
}

type applyResult struct {
	results []state.Result
	// index is the raft index of the log entry the commands are in.
	index uint64
	err   error
}

const (
	// maxBatch bounds the commands of one log entry.
	maxBatch = 4096
	// maxInflight bounds the raft applies in flight; more callers wait
	// and are batched together.
	maxInflight = 4
	// logCacheSize is the number of recent raft entries kept in memory:
	// a few times MaxAppendEntries, so replication and apply never go to
	// the log's segments for entries just written.
	logCacheSize = 1024
	// contactTimeout is how long a follower goes without hearing from
	// the leader before it considers itself cut off (raft's own
	// heartbeat timeout usually notices first).
	contactTimeout = time.Second
)

// NewNode starts a raft node. It returns once raft runs; leadership comes
// later (see Leader).
func NewNode(cfg NodeConfig) (*Node, error) {
	if cfg.ID == "" {
		cfg.ID = "node1"
	}
	if cfg.ApplyTimeout <= 0 {
		cfg.ApplyTimeout = 10 * time.Second
	}
	if cfg.SnapshotThreshold == 0 {
		cfg.SnapshotThreshold = 8192
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("node", cfg.ID)
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("scheduler: %w", err)
	}
	n := &Node{cfg: cfg, log: log, reqs: make(chan *applyReq, 4096), watchers: make(map[string]map[*Watch]struct{})}
	n.fsm = newFSM(cfg.State, n.removed, n.applied)

	store, err := openLogStore(cfg.Dir, hclogger(log), log)
	if err != nil {
		return nil, fmt.Errorf("scheduler: %w", err)
	}
	n.store = store
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.Dir, 2, hclogger(log))
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("scheduler: snapshots: %w", err)
	}
	addr, err := net.ResolveTCPAddr("tcp", cfg.RaftAddr)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("scheduler: raft address %q: %w", cfg.RaftAddr, err)
	}
	var trans *raft.NetworkTransport
	if cfg.RaftDial == nil {
		trans, err = raft.NewTCPTransportWithLogger(cfg.RaftAddr, addr, 8, 10*time.Second, hclogger(log))
	} else {
		trans, err = dialTransport(cfg.RaftAddr, cfg.RaftDial, hclogger(log))
	}
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("scheduler: raft transport: %w", err)
	}
	n.trans = trans

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = hclogger(log)
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = 4 * cfg.SnapshotThreshold
	// Failover well under 2 s on loopback and LANs.
	rc.HeartbeatTimeout = raftTimeout
	rc.ElectionTimeout = raftTimeout
	rc.LeaderLeaseTimeout = 250 * time.Millisecond
	rc.CommitTimeout = 5 * time.Millisecond
	// A node that forms a cluster by itself (the embedded farm) has no one
	// to wait for, yet raft first waits out a heartbeat timeout (500 ms to
	// 1 s) before it elects itself: every `tvixfarm build` on an embedded
	// farm paid that. It starts with short timeouts instead and restores
	// the normal ones once it leads (watchLeadership); only the leader
	// lease, which raft cannot reload, stays short, which matters only if
	// members are added to it later.
	n.fastStart = cfg.Bootstrap && len(cfg.Peers) <= 1
	if n.fastStart {
		rc.HeartbeatTimeout = fastStartTimeout
		rc.ElectionTimeout = fastStartTimeout
		rc.LeaderLeaseTimeout = fastStartTimeout
	}
	rc.BatchApplyCh = true
	rc.MaxAppendEntries = 256
	// A removed node, the leader included, becomes an idle follower
	// rather than shutting raft down under the Node: applies queued at
	// that moment would never return (raft does not fail them), and the
	// node could not be added back without a restart.
	rc.ShutdownOnRemove = false

	if cfg.Bootstrap {
		has, err := raft.HasExistingState(store, store, snaps)
		if err != nil {
			n.closeStores()
			return nil, fmt.Errorf("scheduler: %w", err)
		}
		if !has {
			servers := []raft.Server{{ID: rc.LocalID, Address: trans.LocalAddr()}}
			if len(cfg.Peers) > 0 {
				servers = servers[:0]
				for _, p := range cfg.Peers {
					servers = append(servers, raft.Server{ID: raft.ServerID(p.ID), Address: raft.ServerAddress(p.Raft)})
				}
			}
			if err := raft.BootstrapCluster(rc, store, store, snaps, trans, raft.Configuration{Servers: servers}); err != nil {
				n.closeStores()
				return nil, fmt.Errorf("scheduler: bootstrap: %w", err)
			}
		}
	}
	// Raft reads back every entry it stored: followers to apply it, the
	// leader to replicate it. The last entries stay in memory rather than
	// being read and decoded from the log's segments again.
	logs, err := raft.NewLogCache(logCacheSize, store)
	if err != nil {
		n.closeStores()
		return nil, fmt.Errorf("scheduler: %w", err)
	}
	r, err := raft.NewRaft(rc, n.fsm, logs, store, snaps, trans)
	if err != nil {
		n.closeStores()
		return nil, fmt.Errorf("scheduler: raft: %w", err)
	}
	n.raft = r
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.wg.Add(3)
	go n.batcher()
	go n.announce()
	go n.watchLeadership()
	return n, nil
}

// dialStream is raft's stream layer with a custom dialer.
type dialStream struct {
	net.Listener
	dial func(address string, timeout time.Duration) (net.Conn, error)
}

func (s *dialStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return s.dial(string(address), timeout)
}

// dialTransport is raft's TCP transport, listening on addr, that dials
// with dial.
func dialTransport(addr string, dial func(string, time.Duration) (net.Conn, error), log hclog.Logger) (*raft.NetworkTransport, error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return raft.NewNetworkTransportWithLogger(&dialStream{Listener: lis, dial: dial}, 8, 10*time.Second, log), nil
}

func (n *Node) closeStores() {
	if n.trans != nil {
		n.trans.Close()
	}
	n.store.Close()
}

// Close stops the node: raft shuts down (a leader steps down without
// transferring leadership) and pending applies fail.
func (n *Node) Close() error {
	n.cancel()
	n.wg.Wait()
	err := n.raft.Shutdown().Error()
	n.updateLeading() // ends the streams that wait on it
	n.trans.Close()
	n.store.Close()
	return err
}

// ID is the node's id.
func (n *Node) ID() string { return n.cfg.ID }

// IsLeader reports whether this node leads the cluster.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the leader's id and client address ("" if unknown).
func (n *Node) Leader() (id, client string) {
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", ""
	}
	return string(lid), n.fsm.client(string(lid))
}

// Stats describes the node for status displays.
type Stats struct {
	ID, State, Leader string
	Term              uint64
	// LastIndex is the index of the last entry of this node's log, and
	// AppliedIndex of the last one raft has handed to the state machine
	// (which may not have applied it yet).
	LastIndex    uint64
	AppliedIndex uint64
	Members      []Member
}

// Member is a server of the raft configuration.
type Member struct {
	ID, Raft, Client string
	Voter            bool
}

// Stats returns the node's view of the cluster.
func (n *Node) Stats() Stats {
	s := Stats{ID: n.cfg.ID, State: n.raft.State().String(), Term: n.term(), LastIndex: n.raft.LastIndex(), AppliedIndex: n.raft.AppliedIndex()}
	s.Leader, _ = n.Leader()
	if f := n.raft.GetConfiguration(); f.Error() == nil {
		for _, srv := range f.Configuration().Servers {
			s.Members = append(s.Members, Member{ID: string(srv.ID), Raft: string(srv.Address),
				Client: n.fsm.client(string(srv.ID)), Voter: srv.Suffrage == raft.Voter})
		}
	}
	return s
}

func (n *Node) term() uint64 {
	var t uint64
	fmt.Sscan(n.raft.Stats()["term"], &t)
	return t
}

// AddVoter adds a node to the cluster (on the leader). The node must
// answer at raftAddr as id first: a voter that cannot be reached (a wrong
// address, the gRPC port instead of raft's, a node that is down) would
// take a quorum a one-node cluster cannot reach any more, for good.
func (n *Node) AddVoter(id, raftAddr string) error {
	if !n.IsLeader() {
		return status.Error(codes.Unavailable, "scheduler: not the leader")
	}
	if err := n.probe(id, raftAddr); err != nil {
		return status.Errorf(codes.FailedPrecondition, "scheduler: not adding %s: %v", id, err)
	}
	if err := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, n.cfg.ApplyTimeout).Error(); err != nil {
		return raftError(err)
	}
	return nil
}

// probe asks the raft node at raftAddr, over raft's transport, who it
// is. The request is a pre-vote for term 0, which changes nothing on the
// node whatever its answer.
func (n *Node) probe(id, raftAddr string) error {
	req := &raft.RequestPreVoteRequest{RPCHeader: raft.RPCHeader{
		ProtocolVersion: raft.ProtocolVersionMax,
		ID:              []byte(n.cfg.ID),
		Addr:            n.trans.EncodePeer(raft.ServerID(n.cfg.ID), n.trans.LocalAddr()),
	}}
	var resp raft.RequestPreVoteResponse
	if err := n.trans.RequestPreVote(raft.ServerID(id), raft.ServerAddress(raftAddr), req, &resp); err != nil {
		return fmt.Errorf("no raft node answers at %s (is it running, with raft on that address?): %v", raftAddr, err)
	}
	if got := string(resp.ID); got != "" && got != id {
		return fmt.Errorf("the raft node at %s is %q", raftAddr, got)
	}
	return nil
}

// RemoveServer removes a node from the cluster (on the leader). A leader
// that removes itself steps down once the change is committed; the next
// leader forgets its client address.
func (n *Node) RemoveServer(id string) error {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return raftError(err)
	}
	known := false
	for _, s := range f.Configuration().Servers {
		known = known || s.ID == raft.ServerID(id)
	}
	if !known {
		return status.Errorf(codes.NotFound, "scheduler: %q is not a member", id)
	}
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, n.cfg.ApplyTimeout).Error(); err != nil {
		return raftError(err)
	}
	n.forget(id)
	return nil
}

// forget removes a node's client address from the replicated state.
func (n *Node) forget(id string) {
	data, _ := json.Marshal(member{ID: id, Remove: true})
	if err := n.raft.Apply(append([]byte{entryMember}, data...), n.cfg.ApplyTimeout).Error(); err != nil {
		n.log.Debug("scheduler: cannot forget a removed member's address", "member", id, "err", err)
	}
}

// WaitLeader waits until the cluster has a leader whose client address
// is known, so that calls can be forwarded to it.
func (n *Node) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if id, addr := n.Leader(); id != "" && addr != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// announce records this node's client address in the replicated state
// whenever it becomes leader (followers need it to forward calls), and
// forgets the addresses of nodes that are no longer members.
func (n *Node) announce() {
	defer n.wg.Done()
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	n.raft.RegisterObserver(obs)
	defer n.raft.DeregisterObserver(obs)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		if n.IsLeader() && n.fsm.client(n.cfg.ID) != n.cfg.ClientAddr {
			data, _ := json.Marshal(member{ID: n.cfg.ID, Client: n.cfg.ClientAddr})
			if err := n.raft.Apply(append([]byte{entryMember}, data...), n.cfg.ApplyTimeout).Error(); err != nil {
				n.log.Warn("scheduler: cannot record the client address", "err", err)
			}
		}
		if n.IsLeader() {
			// A leader that removed itself could not do it.
			if f := n.raft.GetConfiguration(); f.Error() == nil {
				in := make(map[string]bool)
				for _, s := range f.Configuration().Servers {
					in[string(s.ID)] = true
				}
				for _, id := range n.fsm.memberIDs() {
					if !in[id] {
						n.forget(id)
					}
				}
			}
		}
		select {
		case <-n.ctx.Done():
			return
		case <-ch:
		case <-t.C:
		}
	}
}

// Apply runs commands through raft and returns their results, in order.
// Commands of concurrent callers share log entries. On a follower they
// are sent to the leader, batched, and Apply returns once this node's
// own state has applied them, so the caller reads its writes. It fails
// with UNAVAILABLE when no leader can be reached or leadership is lost
// meanwhile.
func (n *Node) Apply(ctx context.Context, cmds ...*schedulerpb.Command) ([]state.Result, error) {
	res, index, err := n.apply(ctx, cmds)
	if err != nil {
		return nil, err
	}
	if err := n.waitApplied(ctx, index); err != nil {
		return nil, err
	}
	return res, nil
}

// waitApplied waits until this node's state has applied the log entry
// at index (on the leader, Apply's entries already are), within the
// apply timeout.
func (n *Node) waitApplied(ctx context.Context, index uint64) error {
	ctx, cancel := context.WithTimeout(ctx, n.cfg.ApplyTimeout)
	defer cancel()
	select {
	case <-n.ctx.Done():
		return status.Error(codes.Unavailable, "scheduler: shutting down")
	default:
	}
	if err := n.fsm.waitApplied(ctx, index); err != nil {
		return status.Errorf(codes.Unavailable, "scheduler: %s has not caught up with the leader (log index %d): %v", n.cfg.ID, index, err)
	}
	return nil
}

// apply is Apply that returns as soon as the leader has applied the
// commands, with the raft index of their entry; this node's state may
// not show them yet.
func (n *Node) apply(ctx context.Context, cmds []*schedulerpb.Command) ([]state.Result, uint64, error) {
	req := &applyReq{cmds: cmds, done: make(chan applyResult, 1)}
	select {
	case n.reqs <- req:
	case <-ctx.Done():
		return nil, 0, status.FromContextError(ctx.Err()).Err()
	case <-n.ctx.Done():
		return nil, 0, status.Error(codes.Unavailable, "scheduler: shutting down")
	}
	// The commands are in the log or about to be: wait for the outcome
	// even if ctx ends, so the caller knows what happened.
	r := <-req.done
	return r.results, r.index, r.err
}

// batcher collects waiting requests into batches and applies them, with
// up to maxInflight applies outstanding: through raft on the leader, on
// the leader over gRPC (Forwarder) on a follower.
func (n *Node) batcher() {
	defer n.wg.Done()
	sem := make(chan struct{}, maxInflight)
	var inflight sync.WaitGroup
	defer inflight.Wait()
	for {
		var first *applyReq
		select {
		case first = <-n.reqs:
		case <-n.ctx.Done():
			n.failPending()
			return
		}
		select {
		case sem <- struct{}{}:
		case <-n.ctx.Done():
			first.done <- applyResult{err: status.Error(codes.Unavailable, "scheduler: shutting down")}
			n.failPending()
			return
		}
		reqs := []*applyReq{first}
		count := len(first.cmds)
	collect:
		for count < maxBatch {
			select {
			case r := <-n.reqs:
				reqs = append(reqs, r)
				count += len(r.cmds)
			default:
				break collect
			}
		}
		batch := &schedulerpb.Batch{Commands: make([]*schedulerpb.Command, 0, count)}
		for _, r := range reqs {
			batch.Commands = append(batch.Commands, r.cmds...)
		}
		n.mu.Lock()
		remote := n.remote
		n.mu.Unlock()
		if !n.IsLeader() && remote != nil {
			inflight.Add(1)
			go func() {
				defer inflight.Done()
				results, index, err := n.applyRemote(remote, batch)
				<-sem
				if errors.Is(err, errLeaderNow) {
					n.requeue(reqs)
					return
				}
				deliverResults(reqs, results, index, err)
			}()
			continue
		}
		data, err := proto.Marshal(batch)
		if err != nil {
			deliverResults(reqs, nil, 0, status.Errorf(codes.Internal, "scheduler: %v", err))
			<-sem
			continue
		}
		f := n.raft.Apply(append([]byte{entryBatch}, data...), n.cfg.ApplyTimeout)
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer func() { <-sem }()
			err := f.Error()
			var resp *state.Response
			if err == nil {
				switch v := f.Response().(type) {
				case *state.Response:
					resp = v
				case error:
					err = v
				}
			}
			if err != nil || resp == nil {
				deliverResults(reqs, nil, 0, raftError(cmpErr(err)))
				return
			}
			deliverResults(reqs, resp.Results, f.Index(), nil)
			idx := f.Index()
			time.AfterFunc(nudgeDelay, func() { n.nudge(idx) })
		}()
	}
}

// nudge tells the followers at once that entry idx is committed, if no
// later entry is on its way to do so. A follower learns the commit index
// only from the leader's next AppendEntries, which raft sends for an idle
// log after CommitTimeout (5 to 10 ms): every operation that completed
// while the cluster was otherwise quiet reached a client of a follower
// that much later. An empty barrier entry, nudgeDelay after the commit,
// carries the commit index sooner. Under load, entries follow each other
// within nudgeDelay and no barrier is added.
func (n *Node) nudge(idx uint64) {
	if n.ctx.Err() != nil || n.raft.LastIndex() != idx || !n.IsLeader() {
		return
	}
	f := n.raft.GetConfiguration()
	if f.Error() != nil || len(f.Configuration().Servers) < 2 {
		return
	}
	n.raft.Barrier(n.cfg.ApplyTimeout) // not waited for: only its replication matters
}

// nudgeDelay is how long the log must stay idle after a commit before
// nudge adds a barrier: longer than the gaps between entries under load
// (a barrier there costs an fsync on every node for nothing), well under
// raft's CommitTimeout.
const nudgeDelay = 200 * time.Microsecond

// deliverResults hands each request its part of a batch's results, or err.
func deliverResults(reqs []*applyReq, results []state.Result, index uint64, err error) {
	if err == nil && len(results) != batchLen(reqs) {
		err = status.Errorf(codes.Internal, "scheduler: %d results for %d commands", len(results), batchLen(reqs))
	}
	i := 0
	for _, r := range reqs {
		if err != nil {
			r.done <- applyResult{err: err}
			continue
		}
		r.done <- applyResult{results: results[i : i+len(r.cmds)], index: index}
		i += len(r.cmds)
	}
}

func batchLen(reqs []*applyReq) int {
	n := 0
	for _, r := range reqs {
		n += len(r.cmds)
	}
	return n
}

// requeue hands requests back to the batcher, as when they were first
// made: a follower's batch that was waiting for a leader when this node
// was elected.
func (n *Node) requeue(reqs []*applyReq) {
	for _, r := range reqs {
		select {
		case n.reqs <- r:
		case <-n.ctx.Done():
			r.done <- applyResult{err: status.Error(codes.Unavailable, "scheduler: shutting down")}
		}
	}
}

// applyRemote applies a batch on the leader.
func (n *Node) applyRemote(remote func(context.Context, *schedulerpb.Batch) ([]state.Result, uint64, error), b *schedulerpb.Batch) ([]state.Result, uint64, error) {
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.ApplyTimeout)
	defer cancel()
	return remote(ctx, b)
}

func cmpErr(err error) error {
	if err == nil {
		return errors.New("no response from the state machine")
	}
	return err
}

func (n *Node) failPending() {
	for {
		select {
		case r := <-n.reqs:
			r.done <- applyResult{err: status.Error(codes.Unavailable, "scheduler: shutting down")}
		default:
			return
		}
	}
}

// raftError maps raft's errors to gRPC statuses: clients retry
// UNAVAILABLE on another node.
func raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
		errors.Is(err, raft.ErrLeadershipTransferInProgress), errors.Is(err, raft.ErrRaftShutdown),
		errors.Is(err, raft.ErrEnqueueTimeout), errors.Is(err, raft.ErrAbortedByRestore):
		return status.Errorf(codes.Unavailable, "scheduler: %v", err)
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Errorf(codes.Internal, "scheduler: %v", err)
}

// Read calls fn with the replicated state, which fn must only read. On a
// follower the state may lag the leader's by a few entries.
func (n *Node) Read(fn func(*state.State)) { n.fsm.read(fn) }

// A Watch follows one operation on this node's copy of the state.
type Watch struct {
	// C receives a value whenever the operation changes stage.
	C <-chan struct{}

	n     *Node
	op    string
	ch    chan struct{}
	final *schedulerpb.Operation // guarded by n.mu
}

// Watch starts watching operation op; call Stop when done.
func (n *Node) Watch(op string) *Watch {
	w := &Watch{n: n, op: op, ch: make(chan struct{}, 1)}
	w.C = w.ch
	n.mu.Lock()
	if n.watchers[op] == nil {
		n.watchers[op] = make(map[*Watch]struct{})
	}
	n.watchers[op][w] = struct{}{}
	n.mu.Unlock()
	return w
}

// Final returns the operation as it completed if it was removed then
// (it had been deleted, see state.Completion.Deleted) while w watched
// it: the state no longer has it, but its waiters still get the result.
// Once the state no longer finds the operation, Final is set if it
// ever will be.
func (w *Watch) Final() *schedulerpb.Operation {
	w.n.mu.Lock()
	defer w.n.mu.Unlock()
	return w.final
}

// Stop ends the watch.
func (w *Watch) Stop() {
	n := w.n
	n.mu.Lock()
	delete(n.watchers[w.op], w)
	if len(n.watchers[w.op]) == 0 {
		delete(n.watchers, w.op)
	}
	n.mu.Unlock()
}

// removed hands the final form of the operations a batch removed as they
// completed to their watchers. It runs under the state's write lock, so
// that a reader that no longer finds an operation finds its Final.
func (n *Node) removed(resp *state.Response) {
	for _, c := range resp.Completions {
		if c.Deleted == nil {
			continue
		}
		n.mu.Lock()
		for w := range n.watchers[c.Operation] {
			w.final = c.Deleted
		}
		n.mu.Unlock()
	}
}

// LeadershipLost returns a channel that is closed when this node stops
// leading, or already closed if it does not lead. Streams served from
// the leader's state end then: a former leader's state may stop
// changing (it is cut off) and the clients must resume on the new one.
func (n *Node) LeadershipLost() <-chan struct{} {
	n.updateLeading()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.leading == nil {
		return closed
	}
	return n.leading
}

var closed = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// ContactLost returns a channel that is closed when this node loses
// touch with the cluster (it neither leads nor has heard from a leader
// within a second), or already closed if it has. Streams served from a
// node's own state end then: its state may have stopped changing, and
// the clients must resume elsewhere. A leader that hands over its
// leadership and follows the new one stays in touch.
func (n *Node) ContactLost() <-chan struct{} {
	n.updateLeading()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.contact == nil {
		return closed
	}
	return n.contact
}

// inContact reports whether this node leads or has heard from a leader
// lately.
func (n *Node) inContact() bool {
	if n.ctx.Err() != nil {
		return false // closed
	}
	if n.IsLeader() {
		return true
	}
	_, id := n.raft.LeaderWithID()
	return id != "" && id != raft.ServerID(n.cfg.ID) && time.Since(n.raft.LastContact()) < contactTimeout
}

// updateLeading opens or closes n.leading and n.contact after raft's
// state.
func (n *Node) updateLeading() {
	leader := n.IsLeader()
	contact := n.inContact()
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case leader && n.leading == nil:
		n.leading = make(chan struct{})
	case !leader && n.leading != nil:
		close(n.leading)
		n.leading = nil
	}
	switch {
	case contact && n.contact == nil:
		n.contact = make(chan struct{})
	case !contact && n.contact != nil:
		close(n.contact)
		n.contact = nil
	}
}

// watchLeadership keeps n.leading up to date.
func (n *Node) watchLeadership() {
	defer n.wg.Done()
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.RaftState, raft.LeaderObservation:
			return true
		}
		return false
	})
	n.raft.RegisterObserver(obs)
	defer n.raft.DeregisterObserver(obs)
	// Observations may be dropped: check every so often too.
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		n.updateLeading()
		if n.fastStart && n.raft.State() == raft.Leader {
			n.fastStart = false
			rc := n.raft.ReloadableConfig()
			rc.HeartbeatTimeout = raftTimeout
			rc.ElectionTimeout = raftTimeout
			if err := n.raft.ReloadConfig(rc); err != nil {
				n.log.Warn("scheduler: restoring raft timeouts", "err", err)
			}
		}
		select {
		case <-n.ctx.Done():
			return
		case <-ch:
		case <-t.C:
		}
	}
}

const (
	// raftTimeout is raft's heartbeat and election timeout: failover well
	// under 2 s on loopback and LANs.
	raftTimeout = 500 * time.Millisecond
	// fastStartTimeout is the heartbeat and election timeout of a node
	// that forms a cluster by itself, until it leads.
	fastStartTimeout = 50 * time.Millisecond
)

// OnApply registers fn to be called with every applied batch's response,
// in log order, on the FSM's goroutine: fn must not block.
func (n *Node) OnApply(fn func(*state.Response)) {
	n.mu.Lock()
	n.hooks = append(n.hooks, fn)
	n.mu.Unlock()
}

// applied wakes the watchers of the operations a batch changed and runs
// the hooks.
func (n *Node) applied(resp *state.Response) {
	n.mu.Lock()
	hooks := n.hooks
	wake := func(op string) {
		for w := range n.watchers[op] {
			select {
			case w.ch <- struct{}{}:
			default:
			}
		}
	}
	for _, a := range resp.Assignments {
		wake(a.Operation)
	}
	for _, c := range resp.Completions {
		wake(c.Operation)
	}
	for _, r := range resp.Results {
		if r.Operation != "" && r.Err == nil && !r.Deduplicated {
			wake(r.Operation) // requeued, cancelled, ...
		}
	}
	n.mu.Unlock()
	for _, h := range hooks {
		h(resp)
	}
}

// hclogger adapts slog to raft's hclog, at warning level: raft is chatty.
func hclogger(log *slog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:   "raft",
		Level:  hclog.Warn,
		Output: slogWriter{log},
	})
}

type slogWriter struct{ log *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	w.log.Warn(string(trimNL(p)))
	return len(p), nil
}

func trimNL(p []byte) []byte {
	for len(p) > 0 && (p[len(p)-1] == '\n' || p[len(p)-1] == '\r') {
		p = p[:len(p)-1]
	}
	return p
}

var _ io.Writer = slogWriter{}

// setAdmission makes the leader vet forwarded commands with admit before
// applying them.
func (n *Node) setAdmission(admit func(*schedulerpb.Command) error) {
	n.mu.Lock()
	n.admit = admit
	n.mu.Unlock()
}

func (n *Node) admission() func(*schedulerpb.Command) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.admit
}
