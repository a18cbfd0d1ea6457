package gateway_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/longrunning/autogen/longrunningpb"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/gateway"
	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
	"tvixfarm/internal/rpc"
)

// quirks are what the quirky server in front of a real tvixfarm does,
// each the behaviour of some real REAPI server.
type quirks struct {
	// batchZero announces max_batch_total_size_bytes = 0 (no limit
	// known) while refusing batch requests above 4 MiB, gRPC's default
	// message limit.
	batchZero bool
	// dropStreams ends this many Execute or WaitExecution streams with
	// UNAVAILABLE after their first message (if it is not the last);
	// dropped counts them.
	dropStreams, dropped atomic.Int32
	// unavailable fails this many Execute and FindMissingBlobs calls each
	// with UNAVAILABLE before they reach the server.
	unavailableExec, unavailableFind atomic.Int32
	// requireTimeout refuses actions without a timeout; require23
	// refuses actions without a platform on the Action, or with a
	// Command that uses the legacy output fields.
	requireTimeout, require23 bool
	// treeOnly and rootOnly strip root_directory_digest or tree_digest
	// from results' output directories.
	treeOnly, rootOnly bool
	// onlySHA256 announces SHA-256 as the only digest function.
	onlySHA256 bool
	// inlineOnly returns stdout and stderr inlined, without digests.
	inlineOnly bool

	getTree, waitExecution, execute atomic.Int32
	maxBatch                        atomic.Int64
}

// quirkServer is a real gRPC server on loopback that serves the real
// tvixfarm at conn with quirks injected. GetTree is not implemented.
type quirkServer struct {
	repb.UnimplementedCapabilitiesServer
	repb.UnimplementedContentAddressableStorageServer
	repb.UnimplementedExecutionServer
	q    *quirks
	conn *grpc.ClientConn
	cas  repb.ContentAddressableStorageClient
	exec repb.ExecutionClient
	blob blobstore.BlobAccess
}

func startQuirkServer(t *testing.T, real string, q *quirks) string {
	t.Helper()
	conn, err := grpc.NewClient(real, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s := &quirkServer{q: q, conn: conn, cas: repb.NewContentAddressableStorageClient(conn), exec: repb.NewExecutionClient(conn),
		blob: blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{})}
	srv := grpc.NewServer(grpc.UnknownServiceHandler(rpc.ProxyHandler(conn)))
	repb.RegisterCapabilitiesServer(srv, s)
	repb.RegisterContentAddressableStorageServer(srv, s)
	repb.RegisterExecutionServer(srv, s)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

func (s *quirkServer) GetCapabilities(ctx context.Context, req *repb.GetCapabilitiesRequest) (*repb.ServerCapabilities, error) {
	caps, err := repb.NewCapabilitiesClient(s.conn).GetCapabilities(ctx, req)
	if err != nil {
		return nil, err
	}
	if s.q.batchZero {
		caps.CacheCapabilities.MaxBatchTotalSizeBytes = 0
	}
	if s.q.onlySHA256 {
		caps.CacheCapabilities.DigestFunctions = []repb.DigestFunction_Value{repb.DigestFunction_SHA256}
		caps.ExecutionCapabilities.DigestFunction = repb.DigestFunction_SHA256
		caps.ExecutionCapabilities.DigestFunctions = []repb.DigestFunction_Value{repb.DigestFunction_SHA256}
	}
	return caps, nil
}

func (s *quirkServer) FindMissingBlobs(ctx context.Context, req *repb.FindMissingBlobsRequest) (*repb.FindMissingBlobsResponse, error) {
	if s.q.unavailableFind.Add(-1) >= 0 {
		return nil, status.Error(codes.Unavailable, "quirk: unavailable")
	}
	return s.cas.FindMissingBlobs(ctx, req)
}

func (s *quirkServer) BatchUpdateBlobs(ctx context.Context, req *repb.BatchUpdateBlobsRequest) (*repb.BatchUpdateBlobsResponse, error) {
	n := int64(proto.Size(req))
	for {
		m := s.q.maxBatch.Load()
		if n <= m || s.q.maxBatch.CompareAndSwap(m, n) {
			break
		}
	}
	if s.q.batchZero && n > 4<<20 {
		return nil, status.Errorf(codes.InvalidArgument, "quirk: batch of %d bytes exceeds 4 MiB", n)
	}
	return s.cas.BatchUpdateBlobs(ctx, req)
}

func (s *quirkServer) BatchReadBlobs(ctx context.Context, req *repb.BatchReadBlobsRequest) (*repb.BatchReadBlobsResponse, error) {
	return s.cas.BatchReadBlobs(ctx, req)
}

func (s *quirkServer) GetTree(req *repb.GetTreeRequest, stream grpc.ServerStreamingServer[repb.GetTreeResponse]) error {
	s.q.getTree.Add(1)
	return status.Error(codes.Unimplemented, "quirk: no GetTree")
}

func (s *quirkServer) Execute(req *repb.ExecuteRequest, stream grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	s.q.execute.Add(1)
	if s.q.unavailableExec.Add(-1) >= 0 {
		return status.Error(codes.Unavailable, "quirk: unavailable")
	}
	ctx := stream.Context()
	fn, _ := digest.FunctionFromProto(req.DigestFunction)
	ad, err := digest.FromProto(fn, req.ActionDigest)
	if err != nil {
		return err
	}
	var action repb.Action
	if err := getProto(ctx, s.blob, ad, &action); err != nil {
		return err
	}
	if s.q.requireTimeout && action.Timeout == nil {
		return status.Error(codes.InvalidArgument, "quirk: actions need a timeout")
	}
	if s.q.require23 {
		cd, _ := digest.FromProto(fn, action.CommandDigest)
		var cmd repb.Command
		if err := getProto(ctx, s.blob, cd, &cmd); err != nil {
			return err
		}
		if len(action.GetPlatform().GetProperties()) == 0 || len(cmd.OutputPaths) == 0 || len(cmd.OutputFiles)+len(cmd.OutputDirectories) > 0 {
			return status.Error(codes.InvalidArgument, "quirk: REAPI 2.3: the platform on the Action, output_paths only")
		}
	}
	up, err := s.exec.Execute(rpc.ForwardContext(ctx), req)
	if err != nil {
		return err
	}
	return s.forward(up, stream)
}

func (s *quirkServer) WaitExecution(req *repb.WaitExecutionRequest, stream grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	s.q.waitExecution.Add(1)
	up, err := s.exec.WaitExecution(rpc.ForwardContext(stream.Context()), req)
	if err != nil {
		return err
	}
	return s.forward(up, stream)
}

// forward relays an operation stream, dropping it after the first message
// while dropStreams lasts, and rewriting output directories.
func (s *quirkServer) forward(up grpc.ServerStreamingClient[longrunningpb.Operation], down grpc.ServerStreamingServer[longrunningpb.Operation]) error {
	for {
		op, err := up.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if r := op.GetResponse(); r != nil && (s.q.treeOnly || s.q.rootOnly || s.q.inlineOnly) {
			var resp repb.ExecuteResponse
			if err := r.UnmarshalTo(&resp); err != nil {
				return err
			}
			if res := resp.GetResult(); s.q.inlineOnly && res != nil {
				if err := s.inline(down.Context(), res); err != nil {
					return err
				}
			}
			for _, od := range resp.GetResult().GetOutputDirectories() {
				if s.q.treeOnly {
					od.RootDirectoryDigest = nil
				} else {
					od.TreeDigest = nil
				}
			}
			a, _ := anypb.New(&resp)
			op.Result = &longrunningpb.Operation_Response{Response: a}
		}
		if err := down.Send(op); err != nil {
			return err
		}
		if !op.Done && s.q.dropStreams.Add(-1) >= 0 {
			s.q.dropped.Add(1)
			return status.Error(codes.Unavailable, "quirk: stream dropped")
		}
	}
}

// inline moves stdout and stderr into the result (SHA-256 only, as the
// tests that use it).
func (s *quirkServer) inline(ctx context.Context, res *repb.ActionResult) error {
	for _, f := range []struct {
		d   **repb.Digest
		raw *[]byte
	}{{&res.StdoutDigest, &res.StdoutRaw}, {&res.StderrDigest, &res.StderrRaw}} {
		d, err := digest.FromProto(digest.SHA256, *f.d)
		if err != nil {
			return err
		}
		if *f.raw, err = blobstore.GetBytes(ctx, s.blob, d, 1<<20); err != nil {
			return err
		}
		*f.d = nil
	}
	return nil
}

func getProto(ctx context.Context, cas blobstore.BlobAccess, d digest.Digest, m proto.Message) error {
	b, err := blobstore.GetBytes(ctx, cas, d, 1<<20)
	if err != nil {
		return err
	}
	return proto.Unmarshal(b, m)
}

func requireSandbox(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("TVIXFARM_REQUIRE_SANDBOX") == "1" {
			t.Fatal("sandbox required: not root")
		}
		t.Skip("the sandbox needs root")
	}
}

var (
	plainOnce sync.Once
	plainAddr string
	plainErr  error
)

// startPlain starts one tvixfarm in plain-REAPI mode for the package's
// tests (stopped when the test binary exits).
func startPlain(t *testing.T) string {
	t.Helper()
	requireSandbox(t)
	plainOnce.Do(func() {
		cfg := config.Default()
		dir, err := os.MkdirTemp("", "gateway-test-")
		if err != nil {
			plainErr = err
			return
		}
		cfg.Data = dir
		cfg.LogLevel = "warn"
		cfg.Executor.PlainREAPI = true
		e, err := farm.StartEmbedded(cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
		if err != nil {
			plainErr = err
			return
		}
		plainAddr = e.Addr
	})
	if plainErr != nil {
		t.Fatal(plainErr)
	}
	return plainAddr
}

// gw is a gateway on loopback in front of the quirk server, with memory
// stores.
type gw struct {
	remote *gateway.Remote
	local  *blobstore.Instances
	exec   repb.ExecutionClient
	ops    longrunningpb.OperationsClient
}

func startGateway(t *testing.T, remote string, cfg gateway.Config) *gw {
	t.Helper()
	conn, err := grpc.NewClient(remote, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	local := &blobstore.Instances{Default: blobstore.Stores{
		CAS: blobstore.NewMemory(blobstore.CAS, 1<<30),
		AC:  blobstore.NewMemory(blobstore.AC, 1<<26),
	}}
	if cfg.RetryDelay == 0 {
		cfg.RetryDelay = 10 * time.Millisecond
	}
	cfg.Address = remote
	g, err := gateway.New(context.Background(), conn, local, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	srv := grpc.NewServer()
	repb.RegisterExecutionServer(srv, g)
	longrunningpb.RegisterOperationsServer(srv, g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return &gw{remote: g, local: local, exec: repb.NewExecutionClient(cc), ops: longrunningpb.NewOperationsClient(cc)}
}

// testAction is an action in the gateway's CAS: busybox as bin/sh in the
// input root, one large input (a ByteStream upload), many small ones
// (several batches), and outputs: a directory, a file and the streams.
type testAction struct {
	digest digest.Digest
	salt   string
}

func putAction(t *testing.T, cas blobstore.BlobAccess, fn digest.Function, platform map[string]string) testAction {
	t.Helper()
	ctx := context.Background()
	put := func(data []byte) digest.Digest {
		d := digest.Compute(fn, data)
		if err := blobstore.PutBytes(ctx, cas, d, data); err != nil {
			t.Fatal(err)
		}
		return d
	}
	putMsg := func(m proto.Message) digest.Digest {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		return put(b)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("no static /bin/busybox (busybox-static)")
	}
	salt := fmt.Sprint(time.Now().UnixNano())
	large := make([]byte, 5<<20)
	rand.Read(large)
	data := &repb.Directory{}
	for i := 0; i < 40; i++ {
		b := make([]byte, 200<<10)
		rand.Read(b)
		data.Files = append(data.Files, &repb.FileNode{Name: fmt.Sprintf("small%02d", i), Digest: put(b).Proto()})
	}
	data.Files = append(data.Files, &repb.FileNode{Name: "zlarge", Digest: put(large).Proto()})
	bin := &repb.Directory{Files: []*repb.FileNode{{Name: "sh", Digest: put(bb).Proto(), IsExecutable: true}}}
	root := &repb.Directory{Directories: []*repb.DirectoryNode{
		{Name: "bin", Digest: putMsg(bin).Proto()},
		{Name: "build", Digest: putMsg(&repb.Directory{}).Proto()},
		{Name: "data", Digest: putMsg(data).Proto()},
	}}
	p := &repb.Platform{}
	for k, v := range platform {
		p.Properties = append(p.Properties, &repb.Platform_Property{Name: k, Value: v})
	}
	cmd := &repb.Command{
		Arguments: []string{"/bin/sh", "-c", `set -e
mkdir -p dir/sub
echo "$SALT" > dir/sub/f
/bin/sh -c 'cat /data/zlarge | wc -c' > file
echo out; echo err >&2`},
		EnvironmentVariables: []*repb.Command_EnvironmentVariable{{Name: "SALT", Value: salt}},
		WorkingDirectory:     "build",
		OutputPaths:          []string{"dir", "file"},
		Platform:             p,
	}
	action := &repb.Action{CommandDigest: putMsg(cmd).Proto(), InputRootDigest: putMsg(root).Proto(), Platform: p}
	return testAction{digest: putMsg(action), salt: salt}
}

// run executes the action through the gateway and checks its outputs in
// the gateway's CAS.
func (g *gw) run(t *testing.T, a testAction) *repb.ExecuteResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stream, err := g.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: a.digest.Proto(), DigestFunction: a.digest.Function().Proto()})
	if err != nil {
		t.Fatal(err)
	}
	var last *longrunningpb.Operation
	for {
		op, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		last = op
	}
	if last == nil || !last.Done {
		t.Fatalf("stream ended without a completed operation: %v", last)
	}
	if e := last.GetError(); e != nil {
		t.Fatalf("operation failed: %v", status.ErrorProto(e))
	}
	var resp repb.ExecuteResponse
	if err := last.GetResponse().UnmarshalTo(&resp); err != nil {
		t.Fatal(err)
	}
	res := resp.Result
	if res.ExitCode != 0 {
		t.Fatalf("exit code %d: %s", res.ExitCode, g.read(t, a.digest.Function(), res.StderrDigest))
	}
	fn := a.digest.Function()
	if len(res.OutputFiles) != 1 || strings.TrimSpace(string(g.read(t, fn, res.OutputFiles[0].Digest))) != fmt.Sprint(5<<20) {
		t.Errorf("output files %v", res.OutputFiles)
	}
	if len(res.OutputDirectories) != 1 {
		t.Fatalf("output directories %v", res.OutputDirectories)
	}
	od := res.OutputDirectories[0]
	var sub *repb.Directory
	if od.TreeDigest != nil {
		var tree repb.Tree
		if err := proto.Unmarshal(g.read(t, fn, od.TreeDigest), &tree); err != nil {
			t.Fatal(err)
		}
		sub = tree.Children[0]
	} else {
		var root repb.Directory
		proto.Unmarshal(g.read(t, fn, od.RootDirectoryDigest), &root)
		sub = &repb.Directory{}
		proto.Unmarshal(g.read(t, fn, root.Directories[0].Digest), sub)
	}
	if got := string(g.read(t, fn, sub.Files[0].Digest)); got != a.salt+"\n" {
		t.Errorf("dir/sub/f = %q, want %q", got, a.salt+"\n")
	}
	return &resp
}

func (g *gw) read(t *testing.T, fn digest.Function, pd *repb.Digest) []byte {
	t.Helper()
	d, err := digest.FromProto(fn, pd)
	if err != nil {
		t.Fatal(err)
	}
	b, err := blobstore.GetBytes(context.Background(), g.local.Default.CAS, d, 64<<20)
	if err != nil {
		t.Fatalf("%s is not in the gateway's CAS: %v", d, err)
	}
	return b
}

var nixPlatform = map[string]string{"nix-system": "x86_64-linux", "nix-pty": "true", "memory-limit": "1G"}

// TestQuirks runs an action through the gateway onto a server that has
// every quirk at once.
func TestQuirks(t *testing.T) {
	q := &quirks{batchZero: true, requireTimeout: true, require23: true, treeOnly: true}
	q.dropStreams.Store(2)
	q.unavailableExec.Store(2)
	q.unavailableFind.Store(2)
	addr := startQuirkServer(t, startPlain(t), q)
	g := startGateway(t, addr, gateway.Config{DigestFunction: digest.BLAKE3, IsolatedNetwork: true,
		PassProperties: config.DefaultPassProperties, Platform: map[string]string{"OSFamily": "linux"}})
	a := putAction(t, g.local.Default.CAS, digest.BLAKE3, nixPlatform)
	resp := g.run(t, a)
	// nix-pty asked for one log: stdout and stderr are merged.
	if got := string(g.read(t, digest.BLAKE3, resp.Result.StdoutDigest)); got != "out\nerr\n" {
		t.Errorf("merged log %q", got)
	}
	if n := q.getTree.Load(); n != 0 {
		t.Errorf("GetTree called %d times", n)
	}
	if n, d := q.waitExecution.Load(), q.dropped.Load(); d < 1 || n < d {
		t.Errorf("WaitExecution called %d times, %d streams dropped: want a resume per dropped stream", n, d)
	}
	if n := q.execute.Load(); n < 3 {
		t.Errorf("Execute called %d times, want 2 UNAVAILABLE and a success", n)
	}
	if n := q.maxBatch.Load(); n == 0 || n > 4<<20 {
		t.Errorf("largest batch request %d bytes", n)
	}
	if q.unavailableFind.Load() >= 0 {
		t.Error("FindMissingBlobs was not retried")
	}
	// The same action again is a hit of the gateway's action cache.
	resp = g.run(t, a)
	if !resp.CachedResult {
		t.Error("second run was not cached")
	}
	st := g.remote.Status(context.Background())
	if !st.Healthy || st.Forwarded != 1 || st.Failed != 0 {
		t.Errorf("status %+v", st)
	}
}

// TestRootDirectoryOnly: a server that returns output directories as
// root_directory_digest only (REAPI's DIRECTORY_ONLY); the gateway copies
// their Directory messages one by one.
// Its streams come inlined only, without digests: the gateway stores them.
func TestRootDirectoryOnly(t *testing.T) {
	q := &quirks{rootOnly: true, inlineOnly: true}
	addr := startQuirkServer(t, startPlain(t), q)
	g := startGateway(t, addr, gateway.Config{DigestFunction: digest.SHA256, IsolatedNetwork: true, PassProperties: config.DefaultPassProperties})
	resp := g.run(t, putAction(t, g.local.Default.CAS, digest.SHA256, map[string]string{"nix-system": "x86_64-linux"}))
	if so, se := g.read(t, digest.SHA256, resp.Result.StdoutDigest), g.read(t, digest.SHA256, resp.Result.StderrDigest); string(so) != "out\n" || string(se) != "err\n" {
		t.Errorf("stdout %q, stderr %q", so, se)
	}
}

// TestRefusals: a remote without the digest function is refused at
// start; actions of another digest function, and fixed-output ones, are
// refused with errors that say why.
func TestRefusals(t *testing.T) {
	real := startPlain(t)
	conn, err := grpc.NewClient(startQuirkServer(t, real, &quirks{onlySHA256: true}), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	local := &blobstore.Instances{Default: blobstore.Stores{CAS: blobstore.NewMemory(blobstore.CAS, 1<<20), AC: blobstore.NewMemory(blobstore.AC, 1<<20)}}
	_, err = gateway.New(context.Background(), conn, local, gateway.Config{DigestFunction: digest.BLAKE3})
	if err == nil || !strings.Contains(err.Error(), "digest_function") {
		t.Errorf("New against a SHA-256-only server: %v", err)
	}

	g := startGateway(t, real, gateway.Config{DigestFunction: digest.SHA256, PassProperties: config.DefaultPassProperties})
	for _, c := range []struct {
		fn       digest.Function
		platform map[string]string
		want     string
	}{
		{digest.BLAKE3, map[string]string{"nix-system": "x86_64-linux"}, "uses digest function blake3"},
		{digest.SHA256, map[string]string{"nix-system": "x86_64-linux", "network": "true"}, "is a fixed-output derivation"},
		{digest.SHA256, map[string]string{"nix-system": "x86_64-linux"}, "must build without network access"},
	} {
		a := putAction(t, g.local.Default.CAS, c.fn, c.platform)
		stream, err := g.exec.Execute(context.Background(), &repb.ExecuteRequest{ActionDigest: a.digest.Proto(), DigestFunction: c.fn.Proto()})
		if err == nil {
			_, err = stream.Recv()
		}
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v %v: %v, want FAILED_PRECONDITION with %q", c.fn, c.platform, err, c.want)
		}
	}
}

// TestOperations: a client that drops its Execute stream resumes with
// WaitExecution by the gateway's operation name; operations are listed,
// read, and cancelled (here and on the remote).
func TestOperations(t *testing.T) {
	g := startGateway(t, startPlain(t), gateway.Config{DigestFunction: digest.SHA256, IsolatedNetwork: true, PassProperties: config.DefaultPassProperties})
	a := putAction(t, g.local.Default.CAS, digest.SHA256, map[string]string{"nix-system": "x86_64-linux"})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sctx, stop := context.WithCancel(ctx)
	stream, err := g.exec.Execute(sctx, &repb.ExecuteRequest{ActionDigest: a.digest.Proto(), DigestFunction: a.digest.Function().Proto()})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	stop() // the client goes away; the operation runs on
	ws, err := g.exec.WaitExecution(ctx, &repb.WaitExecutionRequest{Name: first.Name})
	if err != nil {
		t.Fatal(err)
	}
	var last *longrunningpb.Operation
	for {
		op, err := ws.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		last = op
	}
	if !last.GetDone() || last.GetResponse() == nil {
		t.Fatalf("WaitExecution ended with %v", last)
	}
	got, err := g.ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: first.Name})
	if err != nil || !got.Done {
		t.Fatalf("GetOperation: %v %v", got, err)
	}
	list, err := g.ops.ListOperations(ctx, &longrunningpb.ListOperationsRequest{Filter: "stage=completed"})
	if err != nil || len(list.Operations) != 1 || list.Operations[0].Name != first.Name {
		t.Fatalf("ListOperations: %v %v", list, err)
	}
	if _, err := g.ops.DeleteOperation(ctx, &longrunningpb.DeleteOperationRequest{Name: first.Name}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.ops.GetOperation(ctx, &longrunningpb.GetOperationRequest{Name: first.Name}); status.Code(err) != codes.NotFound {
		t.Errorf("GetOperation after delete: %v", err)
	}

	// A long action, cancelled: its operation completes with CANCELLED.
	long := putActionScript(t, g.local.Default.CAS, digest.SHA256, "sleep 600")
	stream, err = g.exec.Execute(ctx, &repb.ExecuteRequest{ActionDigest: long.Proto(), DigestFunction: long.Function().Proto()})
	if err != nil {
		t.Fatal(err)
	}
	first, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.ops.CancelOperation(ctx, &longrunningpb.CancelOperationRequest{Name: first.Name}); err != nil {
		t.Fatal(err)
	}
	for {
		op, err := stream.Recv()
		if err != nil {
			t.Fatalf("stream after cancel: %v", err)
		}
		if op.Done {
			if status.ErrorProto(op.GetError()) == nil || status.FromProto(op.GetError()).Code() != codes.Canceled {
				t.Errorf("cancelled operation ended with %v", op.Result)
			}
			break
		}
	}
}

// putActionScript stores a Nix-like action running script with busybox,
// and returns its digest.
func putActionScript(t *testing.T, cas blobstore.BlobAccess, fn digest.Function, script string) digest.Digest {
	t.Helper()
	ctx := context.Background()
	put := func(m proto.Message) digest.Digest {
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		d := digest.Compute(fn, b)
		if err := blobstore.PutBytes(ctx, cas, d, b); err != nil {
			t.Fatal(err)
		}
		return d
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("no static /bin/busybox (busybox-static)")
	}
	bd := digest.Compute(fn, bb)
	if err := blobstore.PutBytes(ctx, cas, bd, bb); err != nil {
		t.Fatal(err)
	}
	root := &repb.Directory{Directories: []*repb.DirectoryNode{
		{Name: "bin", Digest: put(&repb.Directory{Files: []*repb.FileNode{{Name: "sh", Digest: bd.Proto(), IsExecutable: true}}}).Proto()},
		{Name: "build", Digest: put(&repb.Directory{}).Proto()},
	}}
	p := &repb.Platform{Properties: []*repb.Platform_Property{{Name: "nix-system", Value: "x86_64-linux"}}}
	cmd := &repb.Command{Arguments: []string{"/bin/sh", "-c", script, fmt.Sprint(time.Now().UnixNano())}, WorkingDirectory: "build", OutputPaths: []string{"out"}, Platform: p}
	return put(&repb.Action{CommandDigest: put(cmd).Proto(), InputRootDigest: put(root).Proto(), Platform: p})
}
