package scheduler

import (
	"context"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"tvixfarm/internal/rpc"
)

// forwardedKey marks a forwarded call, so that a node that is no longer
// the leader answers UNAVAILABLE instead of forwarding it again.
const forwardedKey = "x-tvixfarm-forwarded"

// ForwardedServices are the gRPC services whose calls run on the leader.
var ForwardedServices = []string{
	"/build.bazel.remote.execution.v2.Execution/",
	"/google.longrunning.Operations/",
	"/tvixfarm.worker.v1.Workers/",
	"/tvixfarm.admin.v1.Cluster/",
}

// Forwarder makes any node accept any client or worker call: on a
// follower, calls of ForwardedServices are proxied, undecoded, to the
// leader's client address. Install its interceptors on the gRPC server.
type Forwarder struct {
	n *Node

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// NewForwarder returns a Forwarder for node n.
func NewForwarder(n *Node) *Forwarder {
	return &Forwarder{n: n, conns: make(map[string]*grpc.ClientConn)}
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
	id, addr := f.n.Leader()
	if id == "" || addr == "" || id == f.n.ID() {
		return nil, status.Error(codes.Unavailable, "scheduler: no leader yet; retry")
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
