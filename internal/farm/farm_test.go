package farm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bazelbuild/remote-apis-sdks/go/pkg/client"
	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

func TestMain(m *testing.M) {
	flag.Parse()
	// The remote-apis-sdks client logs through glog, which writes files
	// (to /tmp by default): keep them in a directory of our own.
	dir, err := os.MkdirTemp("", "glog-")
	if err == nil {
		if f := flag.Lookup("log_dir"); f != nil {
			f.Value.Set(dir)
		}
	}
	code := m.Run()
	if dir != "" {
		os.RemoveAll(dir)
	}
	os.Exit(code)
}

// running is a farm serving on loopback, and a client connection to it.
type running struct {
	f      *farm.Farm
	conn   *grpc.ClientConn
	cancel context.CancelFunc
	served chan error
}

func testConfig(dataDir string) *config.Config {
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Data = dataDir
	return cfg
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// start builds a farm with farm.New and runs Serve until stop or the end
// of the test.
func start(t *testing.T, cfg *config.Config) *running {
	t.Helper()
	f, err := farm.New(context.Background(), cfg, discardLogger())
	if err != nil {
		t.Fatalf("farm.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{f: f, cancel: cancel, served: make(chan error, 1)}
	go func() { r.served <- f.Serve(ctx) }()
	conn, err := grpc.NewClient(f.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	r.conn = conn
	t.Cleanup(func() {
		conn.Close()
		cancel()
		select {
		case <-r.served:
		case <-time.After(20 * time.Second):
			t.Errorf("Serve did not return at cleanup")
		}
	})
	return r
}

// stop cancels Serve's context and returns Serve's result.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.served:
		r.served <- err // for the cleanup
		return err
	case <-time.After(20 * time.Second):
		t.Fatalf("Serve did not return within 20s of its context ending")
		return nil
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func sha(data []byte) *repb.Digest {
	h := sha256.Sum256(data)
	return &repb.Digest{Hash: hex.EncodeToString(h[:]), SizeBytes: int64(len(data))}
}

func randBytes(seed uint64, n int) []byte {
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 9})
	b := make([]byte, n)
	r.Read(b)
	return b
}

func checkCapabilities(t *testing.T, conn *grpc.ClientConn) {
	t.Helper()
	caps, err := repb.NewCapabilitiesClient(conn).GetCapabilities(ctxT(t), &repb.GetCapabilitiesRequest{})
	if err != nil {
		t.Fatalf("GetCapabilities: %v", err)
	}
	cc := caps.GetCacheCapabilities()
	if !slices.Equal(cc.GetDigestFunctions(), []repb.DigestFunction_Value{repb.DigestFunction_SHA256, repb.DigestFunction_BLAKE3}) ||
		cc.GetMaxBatchTotalSizeBytes() != 4<<20 || !cc.GetActionCacheUpdateCapabilities().GetUpdateEnabled() ||
		!slices.Contains(cc.GetSupportedCompressors(), repb.Compressor_ZSTD) ||
		caps.GetLowApiVersion().GetMajor() != 2 || caps.GetHighApiVersion().GetMinor() != 11 {
		t.Fatalf("GetCapabilities = %v", caps)
	}
}

func batchUpload(t *testing.T, conn *grpc.ClientConn, instance string, blobs ...[]byte) {
	t.Helper()
	req := &repb.BatchUpdateBlobsRequest{InstanceName: instance}
	for _, b := range blobs {
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: sha(b), Data: b})
	}
	resp, err := repb.NewContentAddressableStorageClient(conn).BatchUpdateBlobs(ctxT(t), req)
	if err != nil {
		t.Fatalf("BatchUpdateBlobs: %v", err)
	}
	for _, r := range resp.Responses {
		if codes.Code(r.Status.GetCode()) != codes.OK {
			t.Fatalf("BatchUpdateBlobs %v: %v", r.Digest, r.Status)
		}
	}
}

func missing(t *testing.T, conn *grpc.ClientConn, instance string, ds ...*repb.Digest) int {
	t.Helper()
	resp, err := repb.NewContentAddressableStorageClient(conn).FindMissingBlobs(ctxT(t), &repb.FindMissingBlobsRequest{InstanceName: instance, BlobDigests: ds})
	if err != nil {
		t.Fatalf("FindMissingBlobs: %v", err)
	}
	return len(resp.MissingBlobDigests)
}

func writeName(d *repb.Digest) string {
	return "uploads/" + strconv.FormatUint(rand.Uint64(), 16) + "/blobs/" + d.Hash + "/" + strconv.FormatInt(d.SizeBytes, 10)
}

func bsWrite(ctx context.Context, conn *grpc.ClientConn, name string, data []byte, finish bool) (*bspb.WriteResponse, error) {
	stream, err := bspb.NewByteStreamClient(conn).Write(ctx)
	if err != nil {
		return nil, err
	}
	const chunk = 64 << 10
	for off := 0; off < len(data); off += chunk {
		end := min(off+chunk, len(data))
		req := &bspb.WriteRequest{WriteOffset: int64(off), Data: data[off:end], FinishWrite: finish && end == len(data)}
		if off == 0 {
			req.ResourceName = name
		}
		if err := stream.Send(req); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, err
		}
	}
	if !finish {
		return nil, nil
	}
	return stream.CloseAndRecv()
}

func bsRead(t *testing.T, conn *grpc.ClientConn, d *repb.Digest) []byte {
	t.Helper()
	stream, err := bspb.NewByteStreamClient(conn).Read(ctxT(t), &bspb.ReadRequest{ResourceName: "blobs/" + d.Hash + "/" + strconv.FormatInt(d.SizeBytes, 10)})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return buf.Bytes()
		}
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		buf.Write(resp.Data)
	}
}

func TestFarmServeShutdownReopen(t *testing.T) {
	dataDir := t.TempDir()
	r := start(t, testConfig(dataDir))
	if !strings.HasPrefix(r.f.Addr(), "127.0.0.1:") || strings.HasSuffix(r.f.Addr(), ":0") {
		t.Fatalf("Addr() = %q", r.f.Addr())
	}
	checkCapabilities(t, r.conn)
	hresp, err := healthpb.NewHealthClient(r.conn).Check(ctxT(t), &healthpb.HealthCheckRequest{})
	if err != nil || hresp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health check: %v, %v", hresp, err)
	}

	// A full 4 MiB batch needs the server's larger receive limit.
	var batch [][]byte
	for i := range 4 {
		batch = append(batch, randBytes(uint64(i), 1<<20))
	}
	batchUpload(t, r.conn, "", batch...)
	big := randBytes(10, 6<<20)
	resp, err := bsWrite(ctxT(t), r.conn, writeName(sha(big)), big, true)
	if err != nil || resp.CommittedSize != int64(len(big)) {
		t.Fatalf("ByteStream Write: %v, %v", resp, err)
	}
	if !bytes.Equal(bsRead(t, r.conn, sha(big)), big) {
		t.Fatalf("ByteStream Read differs")
	}
	stdout := []byte("hello from the action")
	batchUpload(t, r.conn, "", stdout)
	action := sha([]byte("an action"))
	ac := repb.NewActionCacheClient(r.conn)
	result := &repb.ActionResult{ExitCode: 1, StdoutDigest: sha(stdout), OutputFiles: []*repb.OutputFile{{Path: "big", Digest: sha(big)}}}
	if _, err := ac.UpdateActionResult(ctxT(t), &repb.UpdateActionResultRequest{ActionDigest: action, ActionResult: result}); err != nil {
		t.Fatalf("UpdateActionResult: %v", err)
	}
	got, err := ac.GetActionResult(ctxT(t), &repb.GetActionResultRequest{ActionDigest: action, InlineStdout: true})
	if err != nil || !bytes.Equal(got.StdoutRaw, stdout) {
		t.Fatalf("GetActionResult: %v, %v", got, err)
	}

	// The data directory is locked while the farm runs.
	if f2, err := farm.New(context.Background(), testConfig(dataDir), discardLogger()); err == nil {
		f2.Close()
		t.Fatalf("a second farm opened the data directory of a running one")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Logf("second farm on a locked data directory: %v", err)
	}

	// An interrupted upload waits for a resume when the farm stops.
	half := randBytes(11, 2<<20)
	sctx, scancel := context.WithCancel(ctxT(t))
	name := writeName(sha(half))
	if _, err := bsWrite(sctx, r.conn, name, half[:1<<20], false); err != nil {
		t.Fatal(err)
	}
	bs := bspb.NewByteStreamClient(r.conn)
	deadline := time.Now().Add(10 * time.Second)
	for {
		qs, err := bs.QueryWriteStatus(ctxT(t), &bspb.QueryWriteStatusRequest{ResourceName: name})
		if err == nil && qs.CommittedSize == 1<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("QueryWriteStatus: %v, %v", qs, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	scancel()

	// Shutdown: Serve returns nil, and the server is gone.
	t0 := time.Now()
	if err := r.stop(t); err != nil {
		t.Fatalf("Serve returned %v after its context ended, want nil", err)
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Errorf("shutdown took %v", d)
	}
	_, err = repb.NewCapabilitiesClient(r.conn).GetCapabilities(ctxT(t), &repb.GetCapabilitiesRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("GetCapabilities after shutdown: %v, want UNAVAILABLE", err)
	}
	// The interrupted upload was abandoned: nothing of it is left in the
	// store's temporary directory.
	tmp := filepath.Join(dataDir, "cas", "tmp")
	deadline = time.Now().Add(10 * time.Second)
	for {
		ents, err := os.ReadDir(tmp)
		if err != nil {
			t.Fatalf("reading %s: %v", tmp, err)
		}
		if len(ents) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still holds %d file(s) of abandoned uploads after shutdown", tmp, len(ents))
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A second farm reopens the data directory (the lock was released)
	// and has the data.
	r2 := start(t, testConfig(dataDir))
	checkCapabilities(t, r2.conn)
	all := []*repb.Digest{sha(big), sha(stdout), sha(half)}
	for _, b := range batch {
		all = append(all, sha(b))
	}
	if n := missing(t, r2.conn, "", all...); n != 1 {
		t.Fatalf("after reopening: %d blobs missing, want 1 (the abandoned upload)", n)
	}
	got, err = repb.NewActionCacheClient(r2.conn).GetActionResult(ctxT(t), &repb.GetActionResultRequest{ActionDigest: action})
	if err != nil || !proto.Equal(got, result) {
		t.Fatalf("GetActionResult after reopening: %v, %v", got, err)
	}
	if !bytes.Equal(bsRead(t, r2.conn, sha(big)), big) {
		t.Fatalf("ByteStream Read after reopening differs")
	}
	if err := r2.stop(t); err != nil {
		t.Fatalf("second Serve returned %v", err)
	}
	// And once more, with Close instead of Serve.
	f3, err := farm.New(context.Background(), testConfig(dataDir), discardLogger())
	if err != nil {
		t.Fatalf("third farm.New: %v", err)
	}
	f3.Close()
	f4, err := farm.New(context.Background(), testConfig(dataDir), discardLogger())
	if err != nil {
		t.Fatalf("farm.New after Close: %v", err)
	}
	f4.Close()
}

func TestFarmNewFailureReleasesLock(t *testing.T) {
	dataDir := t.TempDir()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	cfg := testConfig(dataDir)
	cfg.Listen = lis.Addr().String()
	if f, err := farm.New(context.Background(), cfg, discardLogger()); err == nil {
		f.Close()
		t.Fatalf("farm.New on a busy address succeeded")
	}
	r := start(t, testConfig(dataDir))
	checkCapabilities(t, r.conn)
}

func TestFarmInstances(t *testing.T) {
	cfg := testConfig(t.TempDir())
	mem := config.Backend{Memory: &config.Memory{MaxSize: 64 << 20}}
	cfg.Storage.Instances = map[string]config.InstanceStorage{"isolated/one": {CAS: mem, ActionCache: config.Backend{Memory: &config.Memory{MaxSize: 1 << 20}}}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	r := start(t, cfg)
	shared, own := []byte("in the default stores"), []byte("in the isolated stores")
	batchUpload(t, r.conn, "", shared)
	batchUpload(t, r.conn, "isolated/one", own)
	for _, c := range []struct {
		instance          string
		sharedN, isolateN int // blobs missing
	}{
		{"", 0, 1},
		{"some/other", 0, 1},
		{"isolated/one", 1, 0},
	} {
		if n := missing(t, r.conn, c.instance, sha(shared)); n != c.sharedN {
			t.Errorf("instance %q: shared blob missing=%d, want %d", c.instance, n, c.sharedN)
		}
		if n := missing(t, r.conn, c.instance, sha(own)); n != c.isolateN {
			t.Errorf("instance %q: isolated blob missing=%d, want %d", c.instance, n, c.isolateN)
		}
	}
	ac := repb.NewActionCacheClient(r.conn)
	action := sha([]byte("isolated action"))
	if _, err := ac.UpdateActionResult(ctxT(t), &repb.UpdateActionResultRequest{InstanceName: "isolated/one", ActionDigest: action, ActionResult: &repb.ActionResult{ExitCode: 2}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.GetActionResult(ctxT(t), &repb.GetActionResultRequest{ActionDigest: action}); status.Code(err) != codes.NotFound {
		t.Fatalf("isolated action result visible in the default instance: %v", err)
	}
	if res, err := ac.GetActionResult(ctxT(t), &repb.GetActionResultRequest{InstanceName: "isolated/one", ActionDigest: action}); err != nil || res.ExitCode != 2 {
		t.Fatalf("GetActionResult(isolated): %v, %v", res, err)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
}

// TestFarmSDK talks to a farm with the remote-apis-sdks client.
func TestFarmSDK(t *testing.T) {
	r := start(t, testConfig(t.TempDir()))
	ctx := ctxT(t)
	c, err := client.NewClient(ctx, "farm/sdk", client.DialParams{Service: r.f.Addr(), NoSecurity: true}, client.UseBatchOps(true))
	if err != nil {
		t.Fatalf("client.NewClient: %v", err)
	}
	defer c.Close()
	for i, blob := range [][]byte{[]byte("small blob"), randBytes(20, 5<<20)} {
		d, err := c.WriteBlob(ctx, blob)
		if err != nil {
			t.Fatalf("WriteBlob %d: %v", i, err)
		}
		got, _, err := c.ReadBlob(ctx, d)
		if err != nil || !bytes.Equal(got, blob) {
			t.Fatalf("ReadBlob %d: %v", i, err)
		}
	}
	action := sha([]byte("sdk action"))
	if ar, err := c.CheckActionCache(ctx, action); err != nil || ar != nil {
		t.Fatalf("CheckActionCache before update: %v, %v", ar, err)
	}
	if _, err := c.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{InstanceName: c.InstanceName, ActionDigest: action, ActionResult: &repb.ActionResult{ExitCode: 4}}); err != nil {
		t.Fatal(err)
	}
	if ar, err := c.CheckActionCache(ctx, action); err != nil || ar.GetExitCode() != 4 {
		t.Fatalf("CheckActionCache: %v, %v", ar, err)
	}
}
