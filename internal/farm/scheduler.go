package farm

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/grpcservers"
	"tvixfarm/internal/config"
	"tvixfarm/internal/rpc"
	"tvixfarm/scheduler"
	"tvixfarm/scheduler/state"
)

// schedulerRole is the scheduler of this process: a raft node and the
// services on it.
type schedulerRole struct {
	node    *scheduler.Node
	workers *scheduler.Workers
	exec    *scheduler.Execution
	fwd     *scheduler.Forwarder
	cancel  context.CancelFunc
}

func (s *schedulerRole) Close() error {
	s.cancel()
	s.fwd.Close()
	return s.node.Close()
}

// raftAddr is the default raft address: the listen address with the port
// plus two (or an ephemeral port when the listen port is 0). Plus one is
// the binary cache's HTTP port.
func raftAddr(listen string) (string, error) {
	a, err := config.ListenPlus(listen, 2)
	if err != nil {
		return "", fmt.Errorf("scheduler: %w", err)
	}
	host, port, _ := net.SplitHostPort(a)
	if port == "0" {
		// A free port, found now: raft's transport needs a concrete
		// address to advertise.
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return "", err
		}
		defer l.Close()
		return l.Addr().String(), nil
	}
	return a, nil
}

// newScheduler starts the scheduler role; clientAddr is where this
// process serves gRPC.
func (f *Farm) newScheduler(cfg config.Scheduler, clientAddr string, stores *blobstore.Instances, log *slog.Logger) (*schedulerRole, error) {
	ra := cfg.RaftListen
	if ra == "" {
		var err error
		if ra, err = raftAddr(f.cfg.Listen); err != nil {
			return nil, err
		}
	}
	advertise := cfg.Advertise
	if advertise == "" {
		advertise = clientAddr
	}
	bootstrap := cfg.Bootstrap == nil || *cfg.Bootstrap
	peers := make([]scheduler.Peer, len(cfg.Peers))
	for i, p := range cfg.Peers {
		peers[i] = scheduler.Peer{ID: p.ID, Raft: p.Raft}
	}
	n, err := scheduler.NewNode(scheduler.NodeConfig{
		ID:         cfg.NodeID,
		RaftAddr:   ra,
		ClientAddr: advertise,
		Dir:        filepath.Join(f.cfg.Data, "scheduler"),
		Bootstrap:  bootstrap,
		Peers:      peers,
		State:      state.Config{MaxAttempts: cfg.MaxAttempts},
		Logger:     log,
	})
	if err != nil {
		return nil, err
	}
	if bootstrap && len(peers) == 0 && !f.embedded {
		// A single node elects itself within a second: wait, so that
		// the first client does not have to retry. (An embedded farm's
		// client starts with the store and retries Execute.)
		wctx, wcancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := n.WaitLeader(wctx)
		wcancel()
		if err != nil {
			log.Warn("scheduler: no leader yet", "err", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	ws := scheduler.NewWorkers(ctx, n, stores, scheduler.WorkersConfig{
		HeartbeatInterval: time.Duration(cfg.HeartbeatInterval),
		WorkerTimeout:     time.Duration(cfg.WorkerTimeout),
		RetainCompleted:   time.Duration(cfg.RetainCompleted),
		PlatformGrace:     time.Duration(cfg.PlatformGrace),
		Logger:            log,
	})
	ex := scheduler.NewExecution(n, stores, ws, scheduler.ExecutionConfig{
		CancelOnDisconnect: cfg.CancelOnDisconnect,
		PlatformGrace:      time.Duration(cfg.PlatformGrace),
		Logger:             log,
	})
	log.Info("scheduler node started", "id", n.ID(), "raft", ra, "bootstrap", bootstrap)
	return &schedulerRole{node: n, workers: ws, exec: ex, fwd: scheduler.NewForwarder(n), cancel: cancel}, nil
}

// remoteStores is the storage of a role that runs without the storage
// role: a REAPI client of addr.
func (f *Farm) remoteStores(addr string) (*blobstore.Instances, *grpc.ClientConn, error) {
	target, opts, err := rpc.Target(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("storage: %w", err)
	}
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(grpcservers.MaxRecvMsgSize)))...)
	if err != nil {
		return nil, nil, fmt.Errorf("storage %s: %w", addr, err)
	}
	f.closers = append(f.closers, conn)
	return &blobstore.Instances{Default: blobstore.Stores{
		CAS: blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{}),
		AC:  blobstore.NewGRPCActionCache(conn, "", blobstore.GRPCOptions{}),
	}}, conn, nil
}
