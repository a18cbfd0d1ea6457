package scheduler

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"tvixfarm/internal/rpc"
	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	"tvixfarm/scheduler/state"
)

// forwardedKey marks a forwarded call, so that a node that is no longer
// the leader answers UNAVAILABLE instead of forwarding it again.
const forwardedKey = "x-tvixfarm-forwarded"

// electionWait bounds how long a follower waits for a leader to forward
// to.
const electionWait = 2 * time.Second

// errLeaderNow is what applyOnLeader returns, having applied nothing,
// once this node leads: the batcher applies the batch itself. Before,
// such batches waited out electionWait, and the new leader's own
// applies (the workers' registrations first) queued behind them.
var errLeaderNow = errors.New("scheduler: this node leads now; nothing applied")

// noLeader is the message of the UNAVAILABLE error of a call that found no
// leader to forward to.
const noLeader = "scheduler: no leader yet; retry"

// ForwardedServices are the gRPC services whose calls run on the leader.
// Execution's calls (Execute, WaitExecution) run on the node the client
// called: it applies their commands through the leader (Node.Apply) and
// streams the operation from its own copy of the state.
var ForwardedServices = []string{
	"/google.longrunning.Operations/",
	"/tvixfarm.worker.v1.Workers/",
	"/tvixfarm.admin.v1.Cluster/",
}

// Forwarder makes any node accept any client or worker call: on a
// follower, calls of ForwardedServices are proxied, undecoded, to the
// leader's client address, and the node's Apply sends its batches to the
// leader's Leader service, which the Forwarder also serves. Install its
// interceptors on the gRPC server and register it as the Leader server.
type Forwarder struct {
	schedulerpb.UnimplementedLeaderServer
	n *Node

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// NewForwarder returns a Forwarder for node n, and makes n apply through
// it while n follows.
func NewForwarder(n *Node) *Forwarder {
	f := &Forwarder{n: n, conns: make(map[string]*grpc.ClientConn)}
	n.mu.Lock()
	n.remote = f.applyOnLeader
	n.mu.Unlock()
	return f
}

// Close closes the connections to leaders.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
	return nil
}

func forwarded(method string) bool {
	for _, p := range ForwardedServices {
		if strings.HasPrefix(method, p) {
			return true
		}
	}
	return false
}

// target returns a connection to the leader, or nil if this node should
// serve the call itself.
func (f *Forwarder) target(ctx context.Context, method string) (*grpc.ClientConn, error) {
	if !forwarded(method) || f.n.IsLeader() {
		return nil, nil
	}
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get(forwardedKey)) > 0 {
		return nil, status.Error(codes.Unavailable, "scheduler: not the leader (forwarded call)")
	}
	return f.leader()
}

// leader returns a connection to the leader.
func (f *Forwarder) leader() (*grpc.ClientConn, error) {
	id, addr := f.n.Leader()
	if id == "" || addr == "" || id == f.n.ID() {
		return nil, status.Error(codes.Unavailable, noLeader)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns == nil {
		return nil, status.Error(codes.Unavailable, "scheduler: shutting down")
	}
	if c := f.conns[addr]; c != nil {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "scheduler: leader %s at %s: %v", id, addr, err)
	}
	f.conns[addr] = c
	return c, nil
}

// UnaryInterceptor forwards unary calls.
func (f *Forwarder) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		conn, err := f.target(ctx, info.FullMethod)
		if err != nil {
			return nil, err
		}
		if conn == nil {
			return handler(ctx, req)
		}
		reply := &rpc.Frame{}
		if err := conn.Invoke(rpc.ForwardContext(ctx, forwardedKey, "1"), info.FullMethod, req, reply); err != nil {
			return nil, err
		}
		return reply, nil
	}
}

// StreamInterceptor forwards streaming calls, message by message in both
// directions, without decoding them.
func (f *Forwarder) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		conn, err := f.target(ss.Context(), info.FullMethod)
		if err != nil {
			return err
		}
		if conn == nil {
			return handler(srv, ss)
		}
		return rpc.Proxy(ss, conn, info.FullMethod, &grpc.StreamDesc{ServerStreams: info.IsServerStream, ClientStreams: info.IsClientStream}, forwardedKey, "1")
	}
}

// notLeader is the message of the UNAVAILABLE error with which a node
// that does not lead refuses a forwarded batch, before applying anything:
// the follower may send it again to the next leader.
const notLeader = "scheduler: not the leader; nothing applied"

// applyOnLeader applies a batch on the leader: Node.Apply on a follower.
// While there is no leader, or the node it forwards to no longer leads
// (both refusals that applied nothing), it retries for up to
// electionWait: about what an election takes.
func (f *Forwarder) applyOnLeader(ctx context.Context, b *schedulerpb.Batch) ([]state.Result, uint64, error) {
	req := &schedulerpb.ApplyRequest{Batch: b}
	var resp *schedulerpb.ApplyResponse
	var err error
	giveUp := time.Now().Add(electionWait)
	for delay := 10 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		if f.n.IsLeader() {
			// Elected while waiting for a leader: the batch is this
			// node's to apply (Node.batcher does).
			return nil, 0, errLeaderNow
		}
		var conn *grpc.ClientConn
		conn, err = f.leader()
		if err == nil {
			resp, err = schedulerpb.NewLeaderClient(conn).Apply(ctx, req)
			if err == nil || status.Convert(err).Message() != notLeader {
				break
			}
		} else if status.Convert(err).Message() != noLeader {
			return nil, 0, err
		}
		if time.Now().Add(delay).After(giveUp) {
			return nil, 0, err
		}
		select {
		case <-ctx.Done():
			return nil, 0, err
		case <-time.After(delay):
		}
	}
	if err != nil {
		if _, ok := status.FromError(err); !ok || status.Code(err) == codes.Unknown {
			err = status.Errorf(codes.Unavailable, "scheduler: applying on the leader: %v", err)
		}
		return nil, 0, err
	}
	if len(resp.Results) != len(b.Commands) {
		return nil, 0, status.Errorf(codes.Internal, "scheduler: the leader answered %d results for %d commands", len(resp.Results), len(b.Commands))
	}
	results := make([]state.Result, len(resp.Results))
	for i, r := range resp.Results {
		results[i] = state.Result{Operation: r.Operation, Deduplicated: r.Deduplicated, Stale: r.Stale,
			Cancelled: r.Cancelled, Removed: int(r.Removed), Executing: r.Executing}
		if e := r.Error; e != nil {
			results[i].Err = status.Error(codes.Code(e.Code), e.Message)
		}
	}
	return results, resp.Index, nil
}

// Apply serves a follower's Node.Apply: it applies the batch's commands
// on this node, which must lead. Commands the node's admission check
// rejects (see Execution) fail alone, without being applied.
func (f *Forwarder) Apply(ctx context.Context, req *schedulerpb.ApplyRequest) (*schedulerpb.ApplyResponse, error) {
	if !f.n.IsLeader() {
		return nil, status.Error(codes.Unavailable, notLeader)
	}
	cmds := req.GetBatch().GetCommands()
	out := make([]*schedulerpb.CommandResult, len(cmds))
	admitted := cmds
	var idx []int // of admitted commands in cmds, when some are not
	if admit := f.n.admission(); admit != nil {
		admitted = make([]*schedulerpb.Command, 0, len(cmds))
		for i, c := range cmds {
			if err := admit(c); err != nil {
				out[i] = &schedulerpb.CommandResult{Error: statusOf(err)}
				continue
			}
			admitted = append(admitted, c)
			idx = append(idx, i)
		}
	}
	resp := &schedulerpb.ApplyResponse{Results: out}
	if len(admitted) == 0 {
		return resp, nil
	}
	results, index, err := f.n.apply(ctx, admitted)
	if err != nil {
		return nil, err
	}
	resp.Index = index
	for j, r := range results {
		i := j
		if idx != nil {
			i = idx[j]
		}
		out[i] = &schedulerpb.CommandResult{Operation: r.Operation, Deduplicated: r.Deduplicated, Stale: r.Stale,
			Cancelled: r.Cancelled, Removed: int64(r.Removed), Executing: r.Executing}
		if r.Err != nil {
			out[i].Error = statusOf(r.Err)
		}
	}
	return resp, nil
}

// statusOf is err as a Status (code and message).
func statusOf(err error) *schedulerpb.Status {
	st := status.Convert(err)
	return &schedulerpb.Status{Code: int32(st.Code()), Message: st.Message()}
}
