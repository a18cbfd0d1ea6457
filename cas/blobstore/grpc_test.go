package blobstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/blobstore/blobstoretest"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
)

// grpcHooks intercepts a test server's RPCs: it counts them by method
// ("FindMissingBlobs", "Write", ...), records requests, and lets a test
// fail or hold them. Its func fields are set before the server starts.
type grpcHooks struct {
	// before runs before each RPC with its method and 1-based call number
	// (per method); a non-nil error fails the RPC with it.
	before func(ctx context.Context, method string, n int) error
	// failSend, if set, fails the server's n-th message of the call-th
	// ByteStream.Read when it returns an error.
	failSend func(call, msg int) error

	mu    sync.Mutex
	calls map[string]int
	reqs  map[string][]proto.Message // unary requests and ReadRequests
}

func (h *grpcHooks) count(method string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls[method]
}

func (h *grpcHooks) requests(method string) []proto.Message {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]proto.Message(nil), h.reqs[method]...)
}

func (h *grpcHooks) reset() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls, h.reqs = nil, nil
}

func (h *grpcHooks) enter(ctx context.Context, fullMethod string, req any) (string, int, error) {
	method := path.Base(fullMethod)
	h.mu.Lock()
	if h.calls == nil {
		h.calls, h.reqs = map[string]int{}, map[string][]proto.Message{}
	}
	h.calls[method]++
	n := h.calls[method]
	if m, ok := req.(proto.Message); ok {
		h.reqs[method] = append(h.reqs[method], m)
	}
	h.mu.Unlock()
	if h.before != nil {
		return method, n, h.before(ctx, method, n)
	}
	return method, n, nil
}

func (h *grpcHooks) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if _, _, err := h.enter(ctx, info.FullMethod, req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (h *grpcHooks) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	method, n, err := h.enter(ss.Context(), info.FullMethod, nil)
	if err != nil {
		return err
	}
	if method == "Read" {
		ss = &hookedReadStream{ServerStream: ss, h: h, call: n}
	}
	return handler(srv, ss)
}

// hookedReadStream records ReadRequests and fails sends as failSend says.
type hookedReadStream struct {
	grpc.ServerStream
	h    *grpcHooks
	call int
	sent int
}

func (s *hookedReadStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil {
		s.h.mu.Lock()
		s.h.reqs["Read"] = append(s.h.reqs["Read"], proto.Clone(m.(proto.Message)))
		s.h.mu.Unlock()
	}
	return err
}

func (s *hookedReadStream) SendMsg(m any) error {
	s.sent++
	if s.h.failSend != nil {
		if err := s.h.failSend(s.call, s.sent); err != nil {
			return err
		}
	}
	return s.ServerStream.SendMsg(m)
}

// grpcEnv is a tvixfarm storage server on loopback (CAS, ByteStream and
// Capabilities over a CAS store) and a gRPC BlobAccess talking to it.
type grpcEnv struct {
	client  blobstore.BlobAccess
	backing blobstore.BlobAccess // the server's CAS
	hooks   *grpcHooks
	conn    *grpc.ClientConn
}

// newGRPCEnv starts a server over backing (a fresh memory store if nil)
// and returns a client with opts. hooks may be nil.
func newGRPCEnv(t testing.TB, backing blobstore.BlobAccess, hooks *grpcHooks, instance string, opts blobstore.GRPCOptions) *grpcEnv {
	t.Helper()
	if backing == nil {
		backing = blobstore.NewMemory(blobstore.CAS, 1<<30)
	}
	if hooks == nil {
		hooks = &grpcHooks{}
	}
	stores := &blobstore.Instances{Default: blobstore.Stores{CAS: backing, AC: blobstore.NewMemory(blobstore.AC, 64<<20)}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(grpcservers.MaxRecvMsgSize),
		grpc.ChainUnaryInterceptor(hooks.unary),
		grpc.ChainStreamInterceptor(hooks.stream),
	)
	repb.RegisterCapabilitiesServer(srv, &grpcservers.CapabilitiesServer{})
	repb.RegisterContentAddressableStorageServer(srv, grpcservers.NewCASServer(stores))
	bspb.RegisterByteStreamServer(srv, grpcservers.NewByteStreamServer(ctx, stores, 0))
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(lis)
	}()
	// A client with gRPC's default limits: the store must not need more.
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
		<-served
		cancel()
	})
	return &grpcEnv{client: blobstore.NewGRPC(conn, instance, opts), backing: backing, hooks: hooks, conn: conn}
}

// grpcConfigs are the client configurations the tests run: the defaults
// (small blobs in batches) and ByteStream for everything, in small chunks.
var grpcConfigs = []struct {
	name string
	opts blobstore.GRPCOptions
}{
	{"default", blobstore.GRPCOptions{}},
	{"bytestream", blobstore.GRPCOptions{BatchReadBelow: -1, MaxBatchTotalSize: 1, ChunkSize: 64 << 10}},
}

// emptyAbsentUntilPut adapts a REAPI CAS client to the conformance suite.
// REAPI servers treat the empty blob as always present, and so does the
// gRPC store; the suite, written for stores of their own, expects it
// absent until it is put. Only the empty blobs' presence is adapted:
// everything else, including the Put of wrong data under the empty
// digest, goes to the store under test.
type emptyAbsentUntilPut struct {
	blobstore.BlobAccess
	mu     sync.Mutex
	stored map[digest.Digest]bool
}

func (e *emptyAbsentUntilPut) absent(d digest.Digest) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return d == digest.Empty(d.Function()) && !e.stored[d]
}

func (e *emptyAbsentUntilPut) markStored(d digest.Digest) {
	if d == digest.Empty(d.Function()) {
		e.mu.Lock()
		e.stored[d] = true
		e.mu.Unlock()
	}
}

func (e *emptyAbsentUntilPut) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	if e.absent(d) {
		return nil, blobstore.NotFound(blobstore.CAS, d)
	}
	return e.BlobAccess.Get(ctx, d)
}

func (e *emptyAbsentUntilPut) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	err := e.BlobAccess.Put(ctx, d, r)
	if err == nil {
		e.markStored(d)
	}
	return err
}

func (e *emptyAbsentUntilPut) PutBatch(ctx context.Context, blobs []blobstore.Blob) []error {
	errs := e.BlobAccess.(blobstore.BatchPutter).PutBatch(ctx, blobs)
	for i, b := range blobs {
		if errs[i] == nil {
			e.markStored(b.Digest)
		}
	}
	return errs
}

func (e *emptyAbsentUntilPut) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	missing, err := e.BlobAccess.FindMissing(ctx, ds)
	if err != nil {
		return nil, err
	}
	set := map[digest.Digest]bool{}
	for _, d := range missing {
		set[d] = true
	}
	var out []digest.Digest
	for _, d := range ds {
		if set[d] || e.absent(d) {
			out = append(out, d)
		}
	}
	return out, nil
}

func TestGRPCConformance(t *testing.T) {
	t.Parallel()
	for _, cfg := range grpcConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			t.Parallel()
			blobstoretest.RunConformance(t, blobstore.CAS, func(t *testing.T) blobstore.BlobAccess {
				env := newGRPCEnv(t, nil, nil, "", cfg.opts)
				return &emptyAbsentUntilPut{BlobAccess: env.client, stored: map[digest.Digest]bool{}}
			})
		})
	}
}

func grpcCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// wantStored checks that the server's store holds exactly data under d.
func wantStored(t testing.TB, ba blobstore.BlobAccess, d digest.Digest, data []byte) {
	t.Helper()
	got, err := blobstore.GetBytes(context.Background(), ba, d, 1<<30)
	if err != nil {
		t.Fatalf("server store: Get(%s): %v", d.Sprint(), err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("server store: %s holds %d wrong bytes", d.Sprint(), len(got))
	}
}

// wantNotStored checks that the server's store lacks d.
func wantNotStored(t testing.TB, ba blobstore.BlobAccess, d digest.Digest) {
	t.Helper()
	if blobstoretest.Present(t, ba, d) {
		t.Fatalf("server store holds %s", d.Sprint())
	}
}

func TestGRPCRoundTrip(t *testing.T) {
	t.Parallel()
	rng := blobstoretest.Rand(t)
	sizes := []int{0, 1, 100 << 10, 3 << 20, 9 << 20}
	for _, cfg := range grpcConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			hooks := &grpcHooks{}
			env := newGRPCEnv(t, nil, hooks, "farm/main", cfg.opts)
			for _, fn := range digest.Functions {
				for _, n := range sizes {
					for _, rd := range blobstoretest.Readers {
						t.Run(fmt.Sprintf("%s/%d/%s", fn, n, rd.Name), func(t *testing.T) {
							ctx := grpcCtx(t)
							b := blobstoretest.RandomBlob(rng, fn, n)
							hooks.reset()
							if err := env.client.Put(ctx, b.Digest, rd.New(b.Data)); err != nil {
								t.Fatalf("Put: %v", err)
							}
							if n > 0 {
								wantStored(t, env.backing, b.Digest, b.Data)
							}
							got, err := blobstoretest.ReadBlob(ctx, env.client, b.Digest)
							if err != nil || !bytes.Equal(got, b.Data) {
								t.Fatalf("Get = %d bytes, %v; want the %d bytes put", len(got), err, n)
							}
							// io.Copy takes the reader's WriteTo.
							rc, err := env.client.Get(ctx, b.Digest)
							if err != nil {
								t.Fatalf("Get: %v", err)
							}
							var buf bytes.Buffer
							if _, err := io.Copy(&buf, rc); err != nil || !bytes.Equal(buf.Bytes(), b.Data) {
								t.Fatalf("io.Copy of Get = %d bytes, %v", buf.Len(), err)
							}
							rc.Close()
							missing, err := env.client.FindMissing(ctx, []digest.Digest{b.Digest})
							if err != nil || len(missing) != 0 {
								t.Fatalf("FindMissing = %v, %v; want nothing missing", missing, err)
							}
							// The RPCs the sizes call for.
							batched := cfg.name == "default" && n <= 1<<20
							want := map[string]int{}
							switch {
							case n == 0: // the empty blob needs no RPC
							case batched:
								want["BatchUpdateBlobs"], want["BatchReadBlobs"], want["FindMissingBlobs"] = 1, 2, 1
							case cfg.name == "default" && n < 4<<20:
								want["BatchUpdateBlobs"], want["Read"], want["FindMissingBlobs"] = 1, 2, 1
							default:
								want["Write"], want["Read"], want["FindMissingBlobs"] = 1, 2, 1
							}
							for _, m := range []string{"BatchUpdateBlobs", "BatchReadBlobs", "FindMissingBlobs", "Read", "Write"} {
								if got := hooks.count(m); got != want[m] {
									t.Errorf("%d %s calls, want %d", got, m, want[m])
								}
							}
							for _, m := range hooks.requests("FindMissingBlobs") {
								if got := m.(*repb.FindMissingBlobsRequest); got.DigestFunction != fn.Proto() || got.InstanceName != "farm/main" {
									t.Errorf("FindMissingBlobs request has digest function %s, instance %q", got.DigestFunction, got.InstanceName)
								}
							}
						})
					}
				}
			}
		})
	}
}

func TestGRPCGetMissing(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, cfg := range grpcConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			env := newGRPCEnv(t, nil, nil, "", cfg.opts)
			for _, fn := range digest.Functions {
				for _, n := range []int{1, 1000, 3 << 20} {
					d := blobstoretest.RandomBlob(rng, fn, n).Digest
					_, err := env.client.Get(grpcCtx(t), d)
					blobstoretest.WantCode(t, err, codes.NotFound, fmt.Sprintf("Get of a missing %d-byte blob", n))
					// The context is added to the message, not around it.
					if msg := status.Convert(err).Message(); strings.Contains(msg, "rpc error") || !strings.Contains(msg, "grpc cas") {
						t.Errorf("error message %q", msg)
					}
					_, err = blobstore.GetBytes(grpcCtx(t), env.client, d, 1<<30)
					blobstoretest.WantCode(t, err, codes.NotFound, "GetBytes of a missing blob")
				}
			}
		})
	}
}

func TestGRPCFindMissingSplit(t *testing.T) {
	rng := blobstoretest.Rand(t)
	hooks := &grpcHooks{}
	env := newGRPCEnv(t, nil, hooks, "", blobstore.GRPCOptions{MaxFindMissingDigests: 7})
	ctx := grpcCtx(t)
	var query, want []digest.Digest
	for i := 0; i < 60; i++ {
		fn := digest.Functions[i%3%2] // both functions, interleaved unevenly
		b := blobstoretest.RandomBlob(rng, fn, 1+rng.IntN(100))
		if i%3 == 0 {
			blobstoretest.MustPut(t, env.backing, b.Digest, b.Data)
		} else {
			want = append(want, b.Digest)
		}
		query = append(query, b.Digest)
	}
	// Duplicates (each occurrence of a missing one is reported, as by the
	// memory store) and the empty blobs, never missing.
	query = append(query, query[1], query[0], digest.Empty(digest.SHA256), query[1], digest.Empty(digest.BLAKE3))
	want = append(want, query[1], query[1])
	missing, err := env.client.FindMissing(ctx, query)
	if err != nil {
		t.Fatalf("FindMissing: %v", err)
	}
	if fmt.Sprint(missing) != fmt.Sprint(want) {
		t.Fatalf("FindMissing = %v\nwant %v", missing, want)
	}
	// Per function, 20 and 40 distinct digests in requests of at most 7.
	if got := hooks.count("FindMissingBlobs"); got != 3+6 {
		t.Errorf("%d FindMissingBlobs requests, want 9", got)
	}
	for _, m := range hooks.requests("FindMissingBlobs") {
		req := m.(*repb.FindMissingBlobsRequest)
		if len(req.BlobDigests) > 7 {
			t.Errorf("a FindMissingBlobs request carries %d digests", len(req.BlobDigests))
		}
		fn, _ := digest.FunctionFromProto(req.DigestFunction)
		for _, pd := range req.BlobDigests {
			d, err := digest.FromProto(fn, pd)
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, q := range query {
				found = found || q == d
			}
			if !found {
				t.Errorf("request for %s has digest %s of another function", req.DigestFunction, pd)
			}
		}
	}
}

func TestGRPCPutWrongData(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, cfg := range grpcConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			env := newGRPCEnv(t, nil, nil, "", cfg.opts)
			for _, n := range []int{100, 3 << 20} {
				for _, rd := range blobstoretest.Readers {
					for _, bad := range []struct {
						name string
						data func([]byte) []byte
					}{
						{"flipped", func(b []byte) []byte { b = bytes.Clone(b); b[len(b)-1] ^= 1; return b }},
						{"short", func(b []byte) []byte { return b[:len(b)-1] }},
						{"long", func(b []byte) []byte { return append(bytes.Clone(b), 0) }},
					} {
						good := blobstoretest.RandomBlob(rng, digest.BLAKE3, n)
						data := bad.data(good.Data)
						err := env.client.Put(grpcCtx(t), good.Digest, rd.New(data))
						blobstoretest.WantCode(t, err, codes.InvalidArgument, fmt.Sprintf("Put of %s data (%d bytes, %s reader)", bad.name, n, rd.Name))
						wantNotStored(t, env.backing, good.Digest)
						wantNotStored(t, env.backing, digest.Compute(digest.BLAKE3, data))
					}
					// A reader failing midway, after most of the data.
					b := blobstoretest.RandomBlob(rng, digest.SHA256, n)
					err := env.client.Put(grpcCtx(t), b.Digest, blobstoretest.ErrAfterReader(b.Data, n-1))
					if !errors.Is(err, blobstoretest.ErrInjected) {
						t.Fatalf("Put with a failing reader: %v, want the reader's error", err)
					}
					wantNotStored(t, env.backing, b.Digest)
				}
			}
		})
	}
}

// TestGRPCPutExisting checks uploads of a blob the server has: the server
// ends the stream early, and the client still checks the caller's data.
func TestGRPCPutExisting(t *testing.T) {
	rng := blobstoretest.Rand(t)
	hooks := &grpcHooks{}
	env := newGRPCEnv(t, nil, hooks, "", blobstore.GRPCOptions{ChunkSize: 64 << 10})
	b := blobstoretest.RandomBlob(rng, digest.SHA256, 9<<20)
	blobstoretest.MustPut(t, env.backing, b.Digest, b.Data)
	for _, rd := range blobstoretest.Readers {
		if err := env.client.Put(grpcCtx(t), b.Digest, rd.New(b.Data)); err != nil {
			t.Fatalf("Put of a stored blob (%s reader): %v", rd.Name, err)
		}
		wrong := bytes.Clone(b.Data)
		wrong[len(wrong)-1] ^= 1
		err := env.client.Put(grpcCtx(t), b.Digest, rd.New(wrong))
		blobstoretest.WantCode(t, err, codes.InvalidArgument, "Put of wrong data for a stored blob")
	}
	if got := hooks.count("Write"); got != 4 {
		t.Errorf("%d ByteStream writes, want 4", got)
	}
	wantStored(t, env.backing, b.Digest, b.Data)
}

func TestGRPCPutBatch(t *testing.T) {
	rng := blobstoretest.Rand(t)
	hooks := &grpcHooks{}
	env := newGRPCEnv(t, nil, hooks, "", blobstore.GRPCOptions{})
	var batch []blobstore.Blob
	total := 0
	for i := 0; i < 400; i++ {
		// Small and medium blobs of both functions, 8 MiB in all: more
		// than two batches' worth.
		n := 1 + rng.IntN(40<<10)
		if i%50 == 0 {
			n = 1<<20 + rng.IntN(1<<20)
		}
		total += n
		b := blobstoretest.RandomBlob(rng, digest.Functions[i%2], n)
		batch = append(batch, blobstore.Blob{Digest: b.Digest, Data: b.Data})
	}
	for _, n := range []int{5 << 20, 4<<20 - 1} { // too large for a batch
		b := blobstoretest.RandomBlob(rng, digest.SHA256, n)
		batch = append(batch, blobstore.Blob{Digest: b.Digest, Data: b.Data})
	}
	nGood := len(batch)
	empty := blobstore.Blob{Digest: digest.Empty(digest.BLAKE3)}
	batch = append(batch, batch[3], empty, batch[len(batch)-1])
	wrong := blobstoretest.RandomBlob(rng, digest.SHA256, 1000)
	wrongLarge := blobstoretest.RandomBlob(rng, digest.SHA256, 6<<20)
	batch = append(batch,
		blobstore.Blob{Digest: wrong.Digest, Data: wrong.Data[:999]},
		blobstore.Blob{Digest: wrongLarge.Digest, Data: append(bytes.Clone(wrongLarge.Data[1:]), 0)},
		blobstore.Blob{Digest: digest.Empty(digest.SHA256), Data: []byte("x")})

	errs := env.client.(blobstore.BatchPutter).PutBatch(grpcCtx(t), batch)
	if len(errs) != len(batch) {
		t.Fatalf("%d results for %d blobs", len(errs), len(batch))
	}
	for i, b := range batch {
		if i < nGood+3 {
			if errs[i] != nil {
				t.Errorf("blob %d (%s): %v", i, b.Digest.Sprint(), errs[i])
			}
			if b.Digest.Size() > 0 {
				wantStored(t, env.backing, b.Digest, b.Data)
			}
			continue
		}
		blobstoretest.WantCode(t, errs[i], codes.InvalidArgument, fmt.Sprintf("blob %d with wrong data", i))
		if b.Digest.Size() > 0 {
			wantNotStored(t, env.backing, b.Digest)
		}
	}
	// At least three batches, each of one function and within the limit;
	// the three large blobs went through ByteStream.
	if got := hooks.count("BatchUpdateBlobs"); got < 3 {
		t.Errorf("%d BatchUpdateBlobs requests for %d bytes", got, total)
	}
	if got := hooks.count("Write"); got != 3 {
		t.Errorf("%d ByteStream writes, want 3", got)
	}
	for _, m := range hooks.requests("BatchUpdateBlobs") {
		req := m.(*repb.BatchUpdateBlobsRequest)
		if size := proto.Size(req); size > grpcservers.MaxBatchTotalSize {
			t.Errorf("a BatchUpdateBlobs request has %d bytes", size)
		}
		fn, _ := digest.FunctionFromProto(req.DigestFunction)
		for _, r := range req.Requests {
			if digest.Compute(fn, r.Data).Hex() != r.Digest.Hash {
				t.Errorf("request for %s carries a blob of another function", fn)
			}
		}
	}
}

// failFirst returns a before hook that fails the first n calls of method
// with code.
func failFirst(method string, n int, code codes.Code) func(context.Context, string, int) error {
	return func(_ context.Context, m string, call int) error {
		if m == method && call <= n {
			return status.Errorf(code, "injected failure %d of %s", call, m)
		}
		return nil
	}
}

func TestGRPCRetry(t *testing.T) {
	rng := blobstoretest.Rand(t)
	small := blobstoretest.RandomBlob(rng, digest.SHA256, 1000)
	large := blobstoretest.RandomBlob(rng, digest.BLAKE3, 5<<20)
	absent := blobstoretest.RandomBlob(rng, digest.SHA256, 500)
	opts := blobstore.GRPCOptions{RetryDelay: time.Millisecond}
	for _, tc := range []struct {
		method string
		code   codes.Code
		fails  int
		// stored blobs before op
		setup []blobstoretest.Blob
		op    func(ctx context.Context, ba blobstore.BlobAccess) error
		// ok is whether op succeeds; calls the calls of method made.
		ok    bool
		calls int
	}{
		{"FindMissingBlobs", codes.Unavailable, 2, []blobstoretest.Blob{small}, func(ctx context.Context, ba blobstore.BlobAccess) error {
			missing, err := ba.FindMissing(ctx, []digest.Digest{small.Digest, absent.Digest})
			if err == nil && (len(missing) != 1 || missing[0] != absent.Digest) {
				err = fmt.Errorf("FindMissing = %v", missing)
			}
			return err
		}, true, 3},
		{"FindMissingBlobs", codes.Unavailable, 10, nil, func(ctx context.Context, ba blobstore.BlobAccess) error {
			_, err := ba.FindMissing(ctx, []digest.Digest{small.Digest})
			return err
		}, false, 4},
		{"BatchUpdateBlobs", codes.ResourceExhausted, 2, nil, func(ctx context.Context, ba blobstore.BlobAccess) error {
			return ba.Put(ctx, small.Digest, blobstoretest.StreamReader(small.Data))
		}, true, 3},
		{"BatchUpdateBlobs", codes.Unavailable, 2, nil, func(ctx context.Context, ba blobstore.BlobAccess) error {
			errs := ba.(blobstore.BatchPutter).PutBatch(ctx, []blobstore.Blob{{Digest: small.Digest, Data: small.Data}})
			return errs[0]
		}, true, 3},
		{"BatchReadBlobs", codes.Unavailable, 2, []blobstoretest.Blob{small}, func(ctx context.Context, ba blobstore.BlobAccess) error {
			return wantGet(ctx, ba, small)
		}, true, 3},
		{"Write", codes.Unavailable, 2, nil, func(ctx context.Context, ba blobstore.BlobAccess) error {
			return ba.Put(ctx, large.Digest, bytes.NewReader(large.Data))
		}, true, 3},
		// A reader that cannot be rewound: no retry.
		{"Write", codes.Unavailable, 2, nil, func(ctx context.Context, ba blobstore.BlobAccess) error {
			return ba.Put(ctx, large.Digest, blobstoretest.StreamReader(large.Data))
		}, false, 1},
		{"Read", codes.Unavailable, 2, []blobstoretest.Blob{large}, func(ctx context.Context, ba blobstore.BlobAccess) error {
			return wantGet(ctx, ba, large)
		}, true, 3},
		// Not retried.
		{"FindMissingBlobs", codes.Internal, 1, nil, func(ctx context.Context, ba blobstore.BlobAccess) error {
			_, err := ba.FindMissing(ctx, []digest.Digest{small.Digest})
			return err
		}, false, 1},
	} {
		t.Run(fmt.Sprintf("%s/%s/%d", tc.method, tc.code, tc.fails), func(t *testing.T) {
			hooks := &grpcHooks{before: failFirst(tc.method, tc.fails, tc.code)}
			env := newGRPCEnv(t, nil, hooks, "", opts)
			for _, b := range tc.setup {
				blobstoretest.MustPut(t, env.backing, b.Digest, b.Data)
			}
			err := tc.op(grpcCtx(t), env.client)
			if tc.ok && err != nil {
				t.Fatalf("failed despite retries: %v", err)
			}
			if !tc.ok {
				blobstoretest.WantCode(t, err, tc.code, "without retries left")
			}
			if got := hooks.count(tc.method); got != tc.calls {
				t.Errorf("%d %s calls, want %d", got, tc.method, tc.calls)
			}
		})
	}
}

func wantGet(ctx context.Context, ba blobstore.BlobAccess, b blobstoretest.Blob) error {
	got, err := blobstoretest.ReadBlob(ctx, ba, b.Digest)
	if err == nil && !bytes.Equal(got, b.Data) {
		err = fmt.Errorf("Get returned %d wrong bytes", len(got))
	}
	return err
}

// TestGRPCGetResume checks that a ByteStream read failing midway resumes
// where it stopped.
func TestGRPCGetResume(t *testing.T) {
	rng := blobstoretest.Rand(t)
	b := blobstoretest.RandomBlob(rng, digest.SHA256, 3<<20+5)
	for _, how := range []string{"Read", "WriteTo"} {
		t.Run(how, func(t *testing.T) {
			hooks := &grpcHooks{failSend: func(call, msg int) error {
				// The first stream breaks after one message (1 MiB), the
				// second after two.
				if msg > call {
					return status.Error(codes.Unavailable, "injected stream failure")
				}
				return nil
			}}
			env := newGRPCEnv(t, nil, hooks, "", blobstore.GRPCOptions{RetryDelay: time.Millisecond})
			blobstoretest.MustPut(t, env.backing, b.Digest, b.Data)
			rc, err := env.client.Get(grpcCtx(t), b.Digest)
			if err != nil {
				t.Fatalf("Get: %v", err)
			}
			defer rc.Close()
			var got []byte
			if how == "Read" {
				got, err = io.ReadAll(rc)
			} else {
				var buf bytes.Buffer
				_, err = rc.(io.WriterTo).WriteTo(&buf)
				got = buf.Bytes()
			}
			if err != nil || !bytes.Equal(got, b.Data) {
				t.Fatalf("read %d bytes, %v; want the blob", len(got), err)
			}
			var offsets []int64
			for _, m := range hooks.requests("Read") {
				offsets = append(offsets, m.(*bspb.ReadRequest).ReadOffset)
			}
			if fmt.Sprint(offsets) != "[0 1048576 3145728]" {
				t.Fatalf("read offsets %v, want [0 1048576 3145728]", offsets)
			}
		})
	}
}

// corruptStore serves wrong data for every blob.
type corruptStore struct {
	blobstore.BlobAccess
	corrupt func([]byte) []byte
}

func (c corruptStore) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	data, err := blobstore.GetBytes(ctx, c.BlobAccess, d, 1<<30)
	if err != nil {
		return nil, err
	}
	return io.NopCloser(bytes.NewReader(c.corrupt(bytes.Clone(data)))), nil
}

func TestGRPCGetCorrupt(t *testing.T) {
	rng := blobstoretest.Rand(t)
	for _, bad := range []struct {
		name    string
		corrupt func([]byte) []byte
	}{
		{"flipped", func(b []byte) []byte { b[len(b)/2] ^= 1; return b }},
		{"short", func(b []byte) []byte { return b[:len(b)-1] }},
		{"long", func(b []byte) []byte { return append(b, 'x') }},
	} {
		t.Run(bad.name, func(t *testing.T) {
			mem := blobstore.NewMemory(blobstore.CAS, 1<<30)
			env := newGRPCEnv(t, corruptStore{mem, bad.corrupt}, nil, "", blobstore.GRPCOptions{})
			for _, n := range []int{100, 3 << 20} {
				b := blobstoretest.RandomBlob(rng, digest.BLAKE3, n)
				blobstoretest.MustPut(t, mem, b.Digest, b.Data)
				got, err := blobstoretest.ReadBlob(grpcCtx(t), env.client, b.Digest)
				blobstoretest.WantCode(t, err, codes.DataLoss, fmt.Sprintf("reading a corrupt %d-byte blob (got %d bytes)", n, len(got)))
				rc, err := env.client.Get(grpcCtx(t), b.Digest)
				if err == nil {
					_, err = io.Copy(io.Discard, rc)
					rc.Close()
				}
				blobstoretest.WantCode(t, err, codes.DataLoss, "io.Copy of a corrupt blob")
			}
		})
	}
}

// blockMethod returns a before hook that holds every call of method until
// its context ends.
func blockMethod(method string) func(context.Context, string, int) error {
	return func(ctx context.Context, m string, _ int) error {
		if m == method {
			<-ctx.Done()
			return status.FromContextError(ctx.Err()).Err()
		}
		return nil
	}
}

// grpcOps are operations that make each kind of RPC.
func grpcOps() []struct {
	method string
	op     func(ctx context.Context, ba blobstore.BlobAccess) error
} {
	small := blobstoretest.NewBlob(digest.SHA256, []byte("small blob"))
	large := blobstoretest.NewBlob(digest.SHA256, bytes.Repeat([]byte("large blob "), 500_000))
	return []struct {
		method string
		op     func(ctx context.Context, ba blobstore.BlobAccess) error
	}{
		{"FindMissingBlobs", func(ctx context.Context, ba blobstore.BlobAccess) error {
			_, err := ba.FindMissing(ctx, []digest.Digest{small.Digest})
			return err
		}},
		{"BatchUpdateBlobs", func(ctx context.Context, ba blobstore.BlobAccess) error {
			return ba.Put(ctx, small.Digest, bytes.NewReader(small.Data))
		}},
		{"BatchReadBlobs", func(ctx context.Context, ba blobstore.BlobAccess) error {
			_, err := blobstoretest.ReadBlob(ctx, ba, small.Digest)
			return err
		}},
		{"Write", func(ctx context.Context, ba blobstore.BlobAccess) error {
			return ba.Put(ctx, large.Digest, bytes.NewReader(large.Data))
		}},
		{"Read", func(ctx context.Context, ba blobstore.BlobAccess) error {
			_, err := blobstoretest.ReadBlob(ctx, ba, large.Digest)
			return err
		}},
	}
}

// TestGRPCDeadline checks that an RPC the server does not answer fails
// with DeadlineExceeded after the timeout.
func TestGRPCDeadline(t *testing.T) {
	const timeout = 200 * time.Millisecond
	for _, o := range grpcOps() {
		t.Run(o.method, func(t *testing.T) {
			env := newGRPCEnv(t, nil, &grpcHooks{before: blockMethod(o.method)}, "", blobstore.GRPCOptions{Timeout: timeout})
			start := time.Now()
			err := o.op(context.Background(), env.client)
			blobstoretest.WantCode(t, err, codes.DeadlineExceeded, "an unanswered RPC")
			if elapsed := time.Since(start); elapsed > 10*timeout {
				t.Fatalf("took %v with a timeout of %v", elapsed, timeout)
			}
		})
	}
}

// TestGRPCCanceled checks that operations end promptly when their context
// is canceled: while the server holds the RPC, and during a retry backoff.
func TestGRPCCanceled(t *testing.T) {
	for _, o := range grpcOps() {
		for _, how := range []string{"held", "backoff", "before"} {
			t.Run(o.method+"/"+how, func(t *testing.T) {
				hooks := &grpcHooks{before: blockMethod(o.method)}
				if how != "held" {
					hooks.before = failFirst(o.method, 1000, codes.Unavailable)
				}
				env := newGRPCEnv(t, nil, hooks, "", blobstore.GRPCOptions{RetryDelay: time.Hour})
				ctx, cancel := context.WithCancel(context.Background())
				if how == "before" {
					cancel()
				} else {
					time.AfterFunc(100*time.Millisecond, cancel)
				}
				defer cancel()
				start := time.Now()
				err := o.op(ctx, env.client)
				blobstoretest.WantCode(t, err, codes.Canceled, "a canceled operation")
				if elapsed := time.Since(start); elapsed > 5*time.Second {
					t.Fatalf("took %v to return after the cancellation", elapsed)
				}
				if how == "backoff" && hooks.count(o.method) != 1 {
					t.Errorf("%d calls, want 1", hooks.count(o.method))
				}
			})
		}
	}
}
