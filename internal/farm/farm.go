// Package farm assembles tvixfarm's roles from a configuration into one
// gRPC server: the storage services (CAS, ByteStream, ActionCache,
// Capabilities) and the executor; later the scheduler and frontend roles.
package farm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/grpcservers"
	"tvixfarm/executor"
	"tvixfarm/internal/config"
	"tvixfarm/internal/rpc"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// Farm is a running tvixfarm process.
type Farm struct {
	cfg     *config.Config
	log     *slog.Logger
	lis     net.Listener
	srv     *grpc.Server
	health  *health.Server
	stores  *blobstore.Instances
	closers []io.Closer
	cancel  context.CancelFunc
	metrics *http.Server
	exec    *executor.Executor
}

// New opens the storage and binds the listener; Serve serves it.
func New(ctx context.Context, cfg *config.Config, log *slog.Logger) (*Farm, error) {
	if err := os.MkdirAll(cfg.Data, 0o755); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	f := &Farm{cfg: cfg, log: log}
	role := cfg.Role
	if role == "" {
		role = "all"
	}
	var stores *blobstore.Instances
	if role == "all" || role == "storage" {
		var err error
		if stores, err = NewStores(cfg.Storage, cfg.Data, log, &f.closers); err != nil {
			f.closeAll()
			return nil, err
		}
		f.stores = stores
	}
	if role == "all" || role == "executor" {
		var cas blobstore.BlobAccess
		if stores != nil {
			cas = stores.For("").CAS
		} else {
			if cfg.Executor.Storage == "" {
				f.closeAll()
				return nil, errors.New("executor role: executor.storage (the farm's storage address) must be set when the storage role runs elsewhere")
			}
			conn, err := grpc.NewClient(cfg.Executor.Storage, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(grpcservers.MaxRecvMsgSize)))
			if err != nil {
				f.closeAll()
				return nil, fmt.Errorf("executor role: storage %s: %w", cfg.Executor.Storage, err)
			}
			f.closers = append(f.closers, conn)
			cas = blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{})
		}
		e, err := f.newExecutor(cfg.Executor, cfg.Data, cas, log)
		if err != nil {
			f.closeAll()
			return nil, err
		}
		f.exec = e
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		f.closeAll()
		return nil, fmt.Errorf("listen: %w", err)
	}
	f.lis = lis
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f.cancel = cancel
	f.srv = grpc.NewServer(
		grpc.MaxRecvMsgSize(grpcservers.MaxRecvMsgSize),
		// Large flow-control windows: blobs are bulk transfers.
		grpc.InitialWindowSize(16<<20), grpc.InitialConnWindowSize(16<<20),
		grpc.WriteBufferSize(1<<20), grpc.ReadBufferSize(1<<20),
		experimental.BufferPool(rpc.BufferPool()),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(unaryLogger(log)),
		grpc.ChainStreamInterceptor(streamLogger(log)),
	)
	if stores != nil {
		repb.RegisterCapabilitiesServer(f.srv, &grpcservers.CapabilitiesServer{})
		repb.RegisterContentAddressableStorageServer(f.srv, grpcservers.NewCASServer(stores))
		repb.RegisterActionCacheServer(f.srv, grpcservers.NewActionCacheServer(stores))
		bspb.RegisterByteStreamServer(f.srv, grpcservers.NewByteStreamServer(bctx, stores, time.Duration(cfg.Storage.UploadIdleTimeout)))
	}
	adminpb.RegisterAdminServer(f.srv, &adminServer{f: f, started: time.Now()})
	f.health = health.NewServer()
	healthpb.RegisterHealthServer(f.srv, f.health)
	reflection.Register(f.srv)
	return f, nil
}

// Addr is the address the farm listens on.
func (f *Farm) Addr() string { return f.lis.Addr().String() }

// Executor returns the in-process executor, or nil if this process does
// not run the executor role.
func (f *Farm) Executor() *executor.Executor { return f.exec }

// Stores returns the farm's storage (nil without the storage role).
func (f *Farm) Stores() *blobstore.Instances { return f.stores }

// Serve serves until ctx ends, then stops gracefully: in-flight requests
// finish (uploads that cannot finish are discarded) within the grace period.
func (f *Farm) Serve(ctx context.Context) error {
	if f.cfg.MetricsListen != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.Handler())
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		f.metrics = &http.Server{Addr: f.cfg.MetricsListen, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := f.metrics.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				f.log.Error("metrics server", "err", err)
			}
		}()
	}
	errc := make(chan error, 1)
	go func() { errc <- f.srv.Serve(f.lis) }()
	f.log.Info("tvixfarm serving", "listen", f.Addr(), "data", f.cfg.Data, "roles", f.roles())
	select {
	case err := <-errc:
		f.closeAll()
		return err
	case <-ctx.Done():
	}
	f.log.Info("shutting down")
	f.health.Shutdown()
	done := make(chan struct{})
	go func() { f.srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		f.log.Warn("grace period over; cancelling remaining requests")
		f.srv.Stop()
	}
	f.closeAll()
	f.log.Info("stopped")
	return nil
}

// Close stops the farm at once.
func (f *Farm) Close() {
	f.srv.Stop()
	f.closeAll()
}

func (f *Farm) closeAll() {
	if f.cancel != nil {
		f.cancel()
	}
	if f.metrics != nil {
		f.metrics.Close()
	}
	for _, c := range f.closers {
		c.Close()
	}
	f.closers = nil
}
