package grpcservers_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/klauspost/compress/zstd"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
)

// env is a real gRPC server on loopback serving the storage services over
// a disk CAS (in a temporary directory) and a memory action cache, plus a
// client connection to it.
type env struct {
	addr   string
	conn   *grpc.ClientConn
	stores *blobstore.Instances
	casDir string

	caps repb.CapabilitiesClient
	cas  repb.ContentAddressableStorageClient
	ac   repb.ActionCacheClient
	bs   bspb.ByteStreamClient
}

type envOptions struct {
	// verifySampleRate is the disk store's sampled verification of large
	// reads (0: never, 1: always).
	verifySampleRate float64
	// idleTimeout is the ByteStream upload idle timeout (0: default).
	idleTimeout time.Duration
}

func newEnv(t testing.TB) *env { return newEnvWith(t, envOptions{}) }

func newEnvWith(t testing.TB, o envOptions) *env {
	t.Helper()
	casDir := t.TempDir()
	cas, err := blobstore.NewDisk(blobstore.CAS, casDir, blobstore.DiskOptions{
		MaxSize:          1 << 30,
		VerifyBelow:      1 << 20,
		VerifySampleRate: o.verifySampleRate,
		// As configured by default: small blobs in packs, large ones
		// through O_DIRECT (and ByteStream's zero-copy read path).
		PackBelow: 64 << 10,
		DirectIO:  true,
	})
	if err != nil {
		t.Fatalf("NewDisk: %v", err)
	}
	stores := &blobstore.Instances{Default: blobstore.Stores{CAS: cas, AC: blobstore.NewMemory(blobstore.AC, 64<<20)}}

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(grpcservers.MaxRecvMsgSize))
	repb.RegisterCapabilitiesServer(srv, &grpcservers.CapabilitiesServer{})
	repb.RegisterContentAddressableStorageServer(srv, grpcservers.NewCASServer(stores))
	repb.RegisterActionCacheServer(srv, grpcservers.NewActionCacheServer(stores))
	bspb.RegisterByteStreamServer(srv, grpcservers.NewByteStreamServer(ctx, stores, o.idleTimeout))
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(lis)
	}()

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-served
		cancel()
		cas.(io.Closer).Close()
	})
	return &env{
		addr:   lis.Addr().String(),
		conn:   conn,
		stores: stores,
		casDir: casDir,
		caps:   repb.NewCapabilitiesClient(conn),
		cas:    repb.NewContentAddressableStorageClient(conn),
		ac:     repb.NewActionCacheClient(conn),
		bs:     bspb.NewByteStreamClient(conn),
	}
}

// fnCase is a digest function as a client selects it.
type fnCase struct {
	name string
	fn   digest.Function
	// proto is the digest_function field clients send: unset for SHA-256
	// (the REAPI default), BLAKE3 for BLAKE3.
	proto repb.DigestFunction_Value
}

var fnCases = []fnCase{
	{"sha256", digest.SHA256, repb.DigestFunction_UNKNOWN},
	{"blake3", digest.BLAKE3, repb.DigestFunction_BLAKE3},
}

func forEachFn(t *testing.T, f func(t *testing.T, fc fnCase)) {
	for _, fc := range fnCases {
		t.Run(fc.name, func(t *testing.T) { f(t, fc) })
	}
}

func (fc fnCase) digest(data []byte) digest.Digest { return digest.Compute(fc.fn, data) }

func (fc fnCase) pd(data []byte) *repb.Digest { return fc.digest(data).Proto() }

// blobPath is "blobs/{hash}/{size}" for SHA-256 and
// "blobs/blake3/{hash}/{size}" for BLAKE3, built by hand rather than with
// the code under test.
func (fc fnCase) blobPath(d digest.Digest) string {
	p := d.Hex() + "/" + strconv.FormatInt(d.Size(), 10)
	if fc.fn == digest.BLAKE3 {
		p = "blake3/" + p
	}
	return p
}

func readName(instance, kind string, fc fnCase, d digest.Digest) string {
	// kind is "blobs" or "compressed-blobs/zstd".
	name := kind + "/" + fc.blobPath(d)
	if instance != "" {
		name = instance + "/" + name
	}
	return name
}

var uploadSeq atomic.Int64

func newUUID() string {
	var b [16]byte
	r := rand.Uint64()
	for i := range 8 {
		b[i] = byte(r >> (8 * i))
	}
	n := uint64(uploadSeq.Add(1))
	for i := range 8 {
		b[8+i] = byte(n >> (8 * i))
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func writeName(instance, uuid, kind string, fc fnCase, d digest.Digest) string {
	name := "uploads/" + uuid + "/" + kind + "/" + fc.blobPath(d)
	if instance != "" {
		name = instance + "/" + name
	}
	return name
}

// randBytes returns n pseudo-random (incompressible) bytes.
func randBytes(seed uint64, n int) []byte {
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16), 42})
	b := make([]byte, n)
	r.Read(b)
	return b
}

// textBytes returns n bytes of compressible text.
func textBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	words := []string{"alpha", "beta", "gamma", "delta", "tvix", "farm", "blob", "digest", "\n"}
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		b.WriteByte(' ')
	}
	return b.Bytes()[:n]
}

func zstdCompress(t testing.TB, data []byte) []byte {
	t.Helper()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(data, nil)
}

func zstdDecompress(t testing.TB, data []byte) []byte {
	t.Helper()
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	out, err := dec.DecodeAll(data, nil)
	if err != nil {
		t.Fatalf("zstd decode: %v", err)
	}
	return out
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantCode(t testing.TB, err error, want codes.Code, what string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("%s: got code %v (%v), want %v", what, got, err, want)
	}
}

// batchUpload stores blobs with BatchUpdateBlobs and requires success.
func (e *env) batchUpload(t testing.TB, instance string, fc fnCase, blobs ...[]byte) {
	t.Helper()
	req := &repb.BatchUpdateBlobsRequest{InstanceName: instance, DigestFunction: fc.proto}
	var size int
	flush := func() {
		if len(req.Requests) == 0 {
			return
		}
		resp, err := e.cas.BatchUpdateBlobs(testCtx(t), req)
		if err != nil {
			t.Fatalf("BatchUpdateBlobs: %v", err)
		}
		for _, r := range resp.Responses {
			if c := codes.Code(r.Status.GetCode()); c != codes.OK {
				t.Fatalf("BatchUpdateBlobs %v: %v %s", r.Digest, c, r.Status.GetMessage())
			}
		}
		req = &repb.BatchUpdateBlobsRequest{InstanceName: instance, DigestFunction: fc.proto}
		size = 0
	}
	for _, b := range blobs {
		if size+len(b) > grpcservers.MaxBatchTotalSize {
			flush()
		}
		req.Requests = append(req.Requests, &repb.BatchUpdateBlobsRequest_Request{Digest: fc.pd(b), Data: b})
		size += len(b)
	}
	flush()
}

// uploadProto stores a message and returns its digest.
func (e *env) uploadProto(t testing.TB, instance string, fc fnCase, m proto.Message) *repb.Digest {
	t.Helper()
	data, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	e.batchUpload(t, instance, fc, data)
	return fc.pd(data)
}

func (e *env) findMissing(t testing.TB, instance string, fc fnCase, ds ...*repb.Digest) []*repb.Digest {
	t.Helper()
	resp, err := e.cas.FindMissingBlobs(testCtx(t), &repb.FindMissingBlobsRequest{InstanceName: instance, BlobDigests: ds, DigestFunction: fc.proto})
	if err != nil {
		t.Fatalf("FindMissingBlobs: %v", err)
	}
	return resp.MissingBlobDigests
}

func (e *env) present(t testing.TB, instance string, fc fnCase, d *repb.Digest) bool {
	t.Helper()
	return len(e.findMissing(t, instance, fc, d)) == 0
}

// bsWrite uploads data under resource name in chunks, the way a client
// does: if the server ends the stream early (the blob is already stored),
// the remaining data is not sent.
func (e *env) bsWrite(ctx context.Context, name string, data []byte, offset int64, chunk int) (*bspb.WriteResponse, error) {
	stream, err := e.bs.Write(ctx)
	if err != nil {
		return nil, err
	}
	first := true
	for {
		n := min(chunk, len(data)-int(offset))
		req := &bspb.WriteRequest{WriteOffset: offset, Data: data[offset : offset+int64(n)], FinishWrite: int(offset)+n == len(data)}
		if first {
			req.ResourceName = name
			first = false
		}
		if err := stream.Send(req); err != nil {
			if errors.Is(err, io.EOF) {
				break // the server has answered: CloseAndRecv tells how
			}
			return nil, err
		}
		offset += int64(n)
		if req.FinishWrite {
			break
		}
	}
	return stream.CloseAndRecv()
}

// bsRead reads a resource, checking that every message is within the
// client's default receive limit.
func (e *env) bsRead(ctx context.Context, name string, offset, limit int64) ([]byte, error) {
	stream, err := e.bs.Read(ctx, &bspb.ReadRequest{ResourceName: name, ReadOffset: offset, ReadLimit: limit})
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return buf.Bytes(), nil
		}
		if err != nil {
			return nil, err
		}
		buf.Write(resp.Data)
	}
}

// waitCommitted polls QueryWriteStatus until it reports want committed
// bytes.
func (e *env) waitCommitted(t testing.TB, name string, want int64) *bspb.QueryWriteStatusResponse {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := e.bs.QueryWriteStatus(testCtx(t), &bspb.QueryWriteStatusRequest{ResourceName: name})
		if err == nil && resp.CommittedSize == want {
			return resp
		}
		if time.Now().After(deadline) {
			t.Fatalf("QueryWriteStatus(%s): got %v, %v; want committed_size %d", name, resp, err, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func containsAll(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
