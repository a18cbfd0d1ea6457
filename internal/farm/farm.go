// Package farm assembles tvixfarm's roles from a configuration into one
// gRPC server: the storage services (CAS, ByteStream, ActionCache,
// Capabilities), the scheduler (REAPI Execution, Operations and the worker
// protocol, on a raft node) and the executor, which connects to the
// scheduler as a worker; and next to it an HTTP server with the Nix binary
// cache (frontend/binarycache).
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
	"path/filepath"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"

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
	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
	"tvixfarm/executor"
	"tvixfarm/executor/worker"
	"tvixfarm/frontend/binarycache"
	"tvixfarm/frontend/gateway"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/frontend/tvix"
	"tvixfarm/internal/config"
	"tvixfarm/internal/rpc"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
	workerpb "tvixfarm/proto/tvixfarm/worker/v1"
	"tvixfarm/scheduler"
)

// Farm is a running tvixfarm process.
type Farm struct {
	cfg    *config.Config
	log    *slog.Logger
	lis    net.Listener
	srv    *grpc.Server
	health *health.Server
	stores *blobstore.Instances
	paths  pathinfo.Store
	// castore is the Tvix view of stores (castore and PathInfo services,
	// DoBuild), set with the storage role.
	castore *castore.Store
	// embedded is set by StartEmbedded.
	embedded bool
	closers  []io.Closer
	cancel   context.CancelFunc
	metrics  *http.Server
	// cache is the binary cache's HTTP server on cacheLis (nil when
	// disabled). Its requests hold cacheMu for reading; stopCache takes
	// it to wait for them, and sets cacheClosed.
	cache       *http.Server
	cacheLis    net.Listener
	cacheMu     sync.RWMutex
	cacheClosed bool
	exec        *executor.Executor
	sched       *schedulerRole
	// gw is the remote execution backend (gateway mode), which serves
	// Execution instead of a scheduler.
	gw *gateway.Remote
	// runner runs actions for the scheduler at schedAddr.
	runner    worker.Runner
	schedAddr string
	workerWG  sync.WaitGroup
}

// parseRoles parses --role: all (storage, scheduler and executor), or a
// comma-separated list of storage, scheduler and executor.
func parseRoles(s string) (map[string]bool, error) {
	if s == "" || s == "all" {
		return map[string]bool{"storage": true, "scheduler": true, "executor": true}, nil
	}
	roles := map[string]bool{}
	for _, r := range strings.Split(s, ",") {
		switch r = strings.TrimSpace(r); r {
		case "storage", "scheduler", "executor":
			roles[r] = true
		default:
			return nil, fmt.Errorf("unknown role %q (known: all, storage, scheduler, executor, or a comma-separated list)", r)
		}
	}
	return roles, nil
}

// executionCapabilities announces remote execution.
func executionCapabilities() *repb.ExecutionCapabilities {
	fns := make([]repb.DigestFunction_Value, len(digest.Functions))
	for i, fn := range digest.Functions {
		fns[i] = fn.Proto()
	}
	return &repb.ExecutionCapabilities{
		DigestFunction:  repb.DigestFunction_SHA256,
		DigestFunctions: fns,
		ExecEnabled:     true,
		ExecutionPriorityCapabilities: &repb.PriorityCapabilities{
			Priorities: []*repb.PriorityCapabilities_PriorityRange{{MinPriority: -1 << 20, MaxPriority: 1 << 20}},
		},
	}
}

// New opens the storage and binds the listener; Serve serves it.
func New(ctx context.Context, cfg *config.Config, log *slog.Logger) (*Farm, error) {
	return newFarm(ctx, cfg, log, false)
}

func newFarm(ctx context.Context, cfg *config.Config, log *slog.Logger, embedded bool) (*Farm, error) {
	if err := os.MkdirAll(cfg.Data, 0o755); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	f := &Farm{cfg: cfg, log: log, embedded: embedded}
	roles, err := parseRoles(cfg.Role)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	f.lis = lis
	if cfg.Execution.IsRemote() {
		// Gateway mode: the remote cluster schedules and executes.
		if !roles["storage"] {
			f.lis.Close()
			return nil, errors.New("execution.backend remote: the gateway needs the storage role (its CAS, path info and binary cache)")
		}
		delete(roles, "scheduler")
		delete(roles, "executor")
	}
	var stores *blobstore.Instances
	if roles["storage"] {
		if stores, err = NewStores(cfg.Storage, cfg.Data, log, &f.closers); err != nil {
			f.closeAll()
			return nil, err
		}
		f.stores = stores
	}
	// A scheduler without local storage serves the storage services by
	// proxying them to the storage it uses, so clients need one address.
	var storageProxy *grpc.ClientConn
	if roles["scheduler"] {
		st := stores
		if st == nil {
			if cfg.Scheduler.Storage == "" {
				f.closeAll()
				return nil, errors.New("scheduler role: scheduler.storage (the farm's storage address) must be set when the storage role runs elsewhere")
			}
			if st, storageProxy, err = f.remoteStores(cfg.Scheduler.Storage); err != nil {
				f.closeAll()
				return nil, fmt.Errorf("scheduler role: %w", err)
			}
		}
		s, err := f.newScheduler(cfg.Scheduler, f.Addr(), st, log)
		if err != nil {
			f.closeAll()
			return nil, err
		}
		f.sched = s
		f.closers = append(f.closers, s)
	}
	if cfg.Execution.IsRemote() {
		g, err := f.newGateway(ctx, cfg.Execution.Remote, stores, log)
		if err != nil {
			f.lis.Close()
			f.closeAll()
			return nil, err
		}
		f.gw = g
	}
	if roles["executor"] {
		f.schedAddr = cfg.Executor.Scheduler
		if f.schedAddr == "" {
			if !roles["scheduler"] {
				f.closeAll()
				return nil, errors.New("executor role: executor.scheduler (flag --scheduler, the address of any scheduler node) must be set when the scheduler role runs elsewhere")
			}
			f.schedAddr = f.Addr()
		}
		var cas blobstore.BlobAccess
		switch {
		case stores != nil:
			cas = stores.For("").CAS
		case cfg.Executor.Storage != "":
			st, _, err := f.remoteStores(cfg.Executor.Storage)
			if err != nil {
				f.closeAll()
				return nil, fmt.Errorf("executor role: %w", err)
			}
			cas = st.Default.CAS
		default:
			// The scheduler node proxies the storage services.
			st, _, err := f.remoteStores(f.schedAddr)
			if err != nil {
				f.closeAll()
				return nil, fmt.Errorf("executor role: %w", err)
			}
			cas = st.Default.CAS
		}
		if cfg.Executor.Sandbox == "noop" {
			f.runner = worker.NoOp{N: cfg.Executor.Slots}
			log.Warn("executor: no-op mode: actions succeed at once without running (for measuring the scheduler)")
		} else {
			e, err := f.newExecutor(cfg.Executor, cfg.Data, cas, log)
			if err != nil {
				f.closeAll()
				return nil, err
			}
			f.exec = e
			f.runner = e
		}
	}
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f.cancel = cancel
	unary := []grpc.UnaryServerInterceptor{unaryLogger(log)}
	streams := []grpc.StreamServerInterceptor{streamLogger(log)}
	if f.sched != nil {
		unary = append(unary, f.sched.fwd.UnaryInterceptor())
		streams = append(streams, f.sched.fwd.StreamInterceptor())
	}
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(grpcservers.MaxRecvMsgSize),
		// Large flow-control windows: blobs are bulk transfers.
		grpc.InitialWindowSize(16 << 20), grpc.InitialConnWindowSize(16 << 20),
		grpc.WriteBufferSize(1 << 20), grpc.ReadBufferSize(1 << 20),
		experimental.BufferPool(rpc.BufferPool()),
		grpc.NumStreamWorkers(streamWorkers),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(streams...),
	}
	if storageProxy != nil {
		opts = append(opts, grpc.UnknownServiceHandler(rpc.ProxyHandler(storageProxy)))
	}
	f.srv = grpc.NewServer(opts...)
	caps := &grpcservers.CapabilitiesServer{}
	if f.sched != nil {
		caps.Execution = executionCapabilities()
		repb.RegisterExecutionServer(f.srv, f.sched.exec)
		longrunningpb.RegisterOperationsServer(f.srv, f.sched.exec)
		workerpb.RegisterWorkersServer(f.srv, f.sched.workers)
		adminpb.RegisterClusterServer(f.srv, scheduler.NewCluster(f.sched.node, f.sched.workers))
		schedulerpb.RegisterLeaderServer(f.srv, f.sched.fwd)
		repb.RegisterCapabilitiesServer(f.srv, caps)
	}
	if f.gw != nil {
		caps.Execution = f.gw.Capabilities()
		repb.RegisterExecutionServer(f.srv, f.gw)
		longrunningpb.RegisterOperationsServer(f.srv, f.gw)
	}
	if stores != nil {
		if f.sched == nil {
			repb.RegisterCapabilitiesServer(f.srv, caps)
		}
		repb.RegisterContentAddressableStorageServer(f.srv, grpcservers.NewCASServer(stores))
		repb.RegisterActionCacheServer(f.srv, grpcservers.NewActionCacheServer(stores))
		bspb.RegisterByteStreamServer(f.srv, grpcservers.NewByteStreamServer(bctx, stores, time.Duration(cfg.Storage.UploadIdleTimeout)))
		if err := os.MkdirAll(cfg.Data, 0o755); err != nil {
			f.lis.Close()
			f.closeAll()
			return nil, fmt.Errorf("data directory: %w", err)
		}
		paths, err := pathinfo.NewIndexed(pathinfo.NewBlobStore(stores.Default.AC, stores.Default.CAS), filepath.Join(cfg.Data, "pathinfo.index"))
		if err != nil {
			f.lis.Close()
			f.closeAll()
			return nil, err
		}
		f.closers = append(f.closers, paths)
		f.paths = paths
		storepb.RegisterStoreServer(f.srv, pathinfo.NewServer(f.paths))
		// Tvix and Snix clients: castore and PathInfoService on the same
		// stores, under tvix.*.v1 and snix.*.v1. Large castore uploads are
		// spooled under the data directory until their digest is known.
		spool := filepath.Join(cfg.Data, "castore-spool")
		os.RemoveAll(spool) // leftovers of uploads a crash interrupted
		if err := os.MkdirAll(spool, 0o700); err != nil {
			log.Warn("castore: no spool directory; large BlobService uploads will fail", "dir", spool, "err", err)
		}
		f.castore = castore.NewStore(stores.Default.CAS, stores.Default.AC, spool)
		tvix.Register(f.srv, f.paths, f.castore, stores.Default.AC)
	}
	if err := f.registerBuildService(bctx, log); err != nil {
		f.lis.Close()
		f.closeAll()
		return nil, err
	}
	adminpb.RegisterAdminServer(f.srv, &adminServer{f: f, started: time.Now()})
	f.health = health.NewServer()
	healthpb.RegisterHealthServer(f.srv, f.health)
	reflection.Register(f.srv)
	if err := f.newBinaryCache(bctx, storageProxy); err != nil {
		f.lis.Close()
		f.closeAll()
		return nil, err
	}
	return f, nil
}

// newBinaryCache binds the binary cache's HTTP listener, if it is enabled
// and this process has the farm's store: its own (storage role) or the
// storage it proxies (scheduler role). Executors alone serve none.
func (f *Farm) newBinaryCache(bctx context.Context, storageProxy *grpc.ClientConn) error {
	cfg := f.cfg.BinaryCache
	addr, err := f.cfg.HTTPListen()
	if err != nil {
		return fmt.Errorf("binary_cache.listen: %w", err)
	}
	if addr == "" {
		return nil
	}
	var paths pathinfo.Store
	var cas blobstore.BlobAccess
	switch {
	case f.paths != nil:
		paths, cas = f.paths, f.stores.Default.CAS
	case storageProxy != nil:
		paths = pathinfo.NewClient(storageProxy)
		cas = blobstore.NewGRPC(storageProxy, "", blobstore.GRPCOptions{})
	default:
		return nil
	}
	opts := binarycache.Options{Priority: cfg.Priority, WantMassQuery: cfg.WantMassQuery, Logger: f.log}
	if cfg.SecretKeyFile != "" {
		k, err := config.LoadSecretKey(cfg.SecretKeyFile)
		if err != nil {
			return fmt.Errorf("binary_cache.secret_key_file: %w", err)
		}
		opts.Key = &k
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("binary cache: listen: %w", err)
	}
	h := binarycache.New(paths, cas, opts)
	f.cacheLis = lis
	f.cache = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			f.cacheMu.RLock()
			defer f.cacheMu.RUnlock()
			if f.cacheClosed {
				http.Error(w, "the farm is stopping", http.StatusServiceUnavailable)
				return
			}
			h.ServeHTTP(w, r)
		}),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		// Requests end with the farm (closeAll cancels bctx).
		BaseContext: func(net.Listener) context.Context { return bctx },
		ErrorLog:    slog.NewLogLogger(f.log.Handler(), slog.LevelWarn),
	}
	if opts.Key != nil {
		f.log.Info("binary cache signs narinfos", "public_key", opts.Key.ToPublicKey().String())
	}
	return nil
}

// HTTPAddr is the address of the binary cache's HTTP server, "" if this
// process serves none.
func (f *Farm) HTTPAddr() string {
	if f.cacheLis == nil {
		return ""
	}
	return f.cacheLis.Addr().String()
}

// Addr is the address the farm listens on.
func (f *Farm) Addr() string { return f.lis.Addr().String() }

// Executor returns the in-process executor, or nil if this process does
// not run the executor role.
func (f *Farm) Executor() *executor.Executor { return f.exec }

// Paths returns the path-info store, nil without the storage role.
func (f *Farm) Paths() pathinfo.Store { return f.paths }

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
	errc := make(chan error, 2)
	go func() { errc <- f.srv.Serve(f.lis) }()
	if f.cache != nil {
		go func() {
			if err := f.cache.Serve(f.cacheLis); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("binary cache: %w", err)
			}
		}()
	}
	wctx, stopWorker := context.WithCancel(ctx)
	defer stopWorker()
	if f.runner != nil {
		if err := f.startWorker(wctx); err != nil {
			f.srv.Stop()
			f.stopCache()
			f.closeAll()
			return err
		}
	}
	f.log.Info("tvixfarm serving", "listen", f.Addr(), "http", f.HTTPAddr(), "data", f.cfg.Data, "roles", f.roles())
	select {
	case err := <-errc:
		f.srv.Stop()
		f.stopCache()
		f.closeAll()
		return err
	case <-ctx.Done():
	}
	f.log.Info("shutting down")
	stopWorker()
	f.workerWG.Wait()
	f.health.Shutdown()
	grace, cancelGrace := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelGrace()
	var stopping sync.WaitGroup
	stopping.Go(f.srv.GracefulStop)
	if f.cache != nil {
		// Finishes the requests in flight (NAR downloads included)
		// while refusing new connections.
		stopping.Go(func() { f.cache.Shutdown(grace) })
	}
	done := make(chan struct{})
	go func() { stopping.Wait(); close(done) }()
	select {
	case <-done:
	case <-grace.Done():
		f.log.Warn("grace period over; cancelling remaining requests")
		f.srv.Stop()
	}
	f.stopCache()
	f.closeAll()
	f.log.Info("stopped")
	return nil
}

// Close stops the farm at once.
func (f *Farm) Close() {
	f.srv.Stop()
	f.stopCache()
	f.closeAll()
}

// stopCache closes the binary cache's server and connections, cancels
// its requests and waits for them to return, so that the stores they read
// can be closed.
func (f *Farm) stopCache() {
	if f.cache == nil {
		return
	}
	if f.cancel != nil {
		f.cancel()
	}
	f.cache.Close()
	f.cacheMu.Lock()
	f.cacheClosed = true
	f.cacheMu.Unlock()
}

// startWorker connects the executor to the scheduler.
func (f *Farm) startWorker(ctx context.Context) error {
	target, opts, err := rpc.Target(f.schedAddr)
	if err != nil {
		return fmt.Errorf("executor: scheduler: %w", err)
	}
	opts = append(opts, worker.DialOptions()...)
	conn, err := grpc.NewClient(target, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		return fmt.Errorf("executor: scheduler %s: %w", f.schedAddr, err)
	}
	name := f.cfg.Executor.Name
	if f.exec != nil {
		name = f.exec.Name()
	}
	if name == "" {
		name, _ = os.Hostname()
	}
	w := worker.New(conn, f.runner, worker.Config{ID: name, Logger: f.log})
	f.workerWG.Add(1)
	go func() {
		defer f.workerWG.Done()
		defer conn.Close()
		w.Run(ctx)
	}()
	return nil
}

func (f *Farm) closeAll() {
	if f.cancel != nil {
		f.cancel()
	}
	if f.metrics != nil {
		f.metrics.Close()
	}
	if f.cacheLis != nil {
		f.cacheLis.Close() // if Serve never ran
	}
	for _, c := range f.closers {
		c.Close()
	}
	f.closers = nil
}

// streamWorkers is the number of goroutines kept to serve RPCs. A worker
// keeps the stack it grew, so the Execute and ByteStream handlers do not
// grow a fresh goroutine's stack for every RPC; RPCs beyond the workers
// busy get a goroutine of their own as before.
const streamWorkers = 256
