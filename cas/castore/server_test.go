package castore_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/zeebo/blake3"
	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/castore"
	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

type env struct {
	st   *castore.Store
	cas  blobstore.BlobAccess
	conn *grpc.ClientConn
}

// newEnv serves castore and the REAPI CAS and ByteStream of one disk store
// on a loopback port.
func newEnv(t testing.TB) *env {
	t.Helper()
	// As the farm configures it by default: small blobs in packs, large
	// ones through O_DIRECT (and the reads that send its buffers).
	cas, err := blobstore.NewDisk(blobstore.CAS, t.TempDir(), blobstore.DiskOptions{MaxSize: 4 << 30,
		PackBelow: 64 << 10, DirectIO: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cas.(io.Closer).Close() })
	ac := blobstore.NewMemory(blobstore.AC, 64<<20)
	st := castore.NewStore(cas, ac, t.TempDir())
	stores := &blobstore.Instances{Default: blobstore.Stores{CAS: cas, AC: ac}}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(grpcservers.MaxRecvMsgSize))
	castore.Register(srv, st)
	repb.RegisterContentAddressableStorageServer(srv, grpcservers.NewCASServer(stores))
	ctx, cancel := context.WithCancel(context.Background())
	bspb.RegisterByteStreamServer(srv, grpcservers.NewByteStreamServer(ctx, stores, time.Minute))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(func() { cancel(); srv.Stop() })
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(grpcservers.MaxRecvMsgSize)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &env{st: st, cas: cas, conn: conn}
}

// family is one client family's view of the castore services, through
// its own generated stubs.
type family struct {
	name     string
	put      func(ctx context.Context, chunks [][]byte) ([]byte, error)
	read     func(ctx context.Context, h []byte) ([]byte, error)
	stat     func(ctx context.Context, h []byte) error
	putDirs  func(ctx context.Context, dirs []*castorepb.Directory) ([]byte, error)
	getDirs  func(ctx context.Context, h []byte, recursive bool) ([]*castorepb.Directory, error)
	cutBlob  func(ctx context.Context, chunks [][]byte) error
	cutDirs  func(ctx context.Context, dirs []*castorepb.Directory) error
	rawBlobs int
}

func families(conn *grpc.ClientConn) []family {
	tb, td := castorepb.NewBlobServiceClient(conn), castorepb.NewDirectoryServiceClient(conn)
	sb, sd := snixcastorepb.NewBlobServiceClient(conn), snixcastorepb.NewDirectoryServiceClient(conn)
	toSnix := func(d *castorepb.Directory) *snixcastorepb.Directory {
		b, _ := proto.Marshal(d)
		var s snixcastorepb.Directory
		if err := proto.Unmarshal(b, &s); err != nil {
			panic(err)
		}
		return &s
	}
	fromSnix := func(s *snixcastorepb.Directory) *castorepb.Directory {
		b, _ := proto.Marshal(s)
		var d castorepb.Directory
		if err := proto.Unmarshal(b, &d); err != nil {
			panic(err)
		}
		return &d
	}
	return []family{{
		name: "tvix",
		put: func(ctx context.Context, chunks [][]byte) ([]byte, error) {
			s, err := tb.Put(ctx)
			if err != nil {
				return nil, err
			}
			for _, c := range chunks {
				if err := s.Send(&castorepb.BlobChunk{Data: c}); err != nil {
					return nil, err
				}
			}
			r, err := s.CloseAndRecv()
			return r.GetDigest(), err
		},
		cutBlob: func(ctx context.Context, chunks [][]byte) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := tb.Put(ctx)
			if err != nil {
				return err
			}
			for _, c := range chunks {
				s.Send(&castorepb.BlobChunk{Data: c})
			}
			cancel()
			// RecvMsg, unlike CloseAndRecv, does not half-close the
			// stream first: the server sees a broken stream, not its end.
			return s.RecvMsg(new(emptypb.Empty))
		},
		read: func(ctx context.Context, h []byte) ([]byte, error) {
			s, err := tb.Read(ctx, &castorepb.ReadBlobRequest{Digest: h})
			if err != nil {
				return nil, err
			}
			var buf bytes.Buffer
			for {
				c, err := s.Recv()
				if errors.Is(err, io.EOF) {
					return buf.Bytes(), nil
				}
				if err != nil {
					return nil, err
				}
				if len(c.Data) > 4<<20 {
					return nil, errors.New("chunk larger than 4 MiB")
				}
				buf.Write(c.Data)
			}
		},
		stat: func(ctx context.Context, h []byte) error {
			r, err := tb.Stat(ctx, &castorepb.StatBlobRequest{Digest: h, SendChunks: true})
			if err == nil && len(r.Chunks) != 0 {
				return errors.New("chunks listed")
			}
			return err
		},
		putDirs: func(ctx context.Context, dirs []*castorepb.Directory) ([]byte, error) {
			s, err := td.Put(ctx)
			if err != nil {
				return nil, err
			}
			for _, d := range dirs {
				if err := s.Send(d); err != nil {
					break // the server answered early; CloseAndRecv has its error
				}
			}
			r, err := s.CloseAndRecv()
			return r.GetRootDigest(), err
		},
		cutDirs: func(ctx context.Context, dirs []*castorepb.Directory) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := td.Put(ctx)
			if err != nil {
				return err
			}
			for _, d := range dirs {
				s.Send(d)
			}
			cancel()
			// RecvMsg, unlike CloseAndRecv, does not half-close the
			// stream first: the server sees a broken stream, not its end.
			return s.RecvMsg(new(emptypb.Empty))
		},
		getDirs: func(ctx context.Context, h []byte, recursive bool) ([]*castorepb.Directory, error) {
			s, err := td.Get(ctx, &castorepb.GetDirectoryRequest{ByWhat: &castorepb.GetDirectoryRequest_Digest{Digest: h}, Recursive: recursive})
			if err != nil {
				return nil, err
			}
			var out []*castorepb.Directory
			for {
				d, err := s.Recv()
				if errors.Is(err, io.EOF) {
					return out, nil
				}
				if err != nil {
					return out, err
				}
				out = append(out, d)
			}
		},
	}, {
		name: "snix",
		put: func(ctx context.Context, chunks [][]byte) ([]byte, error) {
			s, err := sb.Put(ctx)
			if err != nil {
				return nil, err
			}
			for _, c := range chunks {
				if err := s.Send(&snixcastorepb.BlobChunk{Data: c}); err != nil {
					return nil, err
				}
			}
			r, err := s.CloseAndRecv()
			return r.GetDigest(), err
		},
		cutBlob: func(ctx context.Context, chunks [][]byte) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := sb.Put(ctx)
			if err != nil {
				return err
			}
			for _, c := range chunks {
				s.Send(&snixcastorepb.BlobChunk{Data: c})
			}
			cancel()
			// RecvMsg, unlike CloseAndRecv, does not half-close the
			// stream first: the server sees a broken stream, not its end.
			return s.RecvMsg(new(emptypb.Empty))
		},
		read: func(ctx context.Context, h []byte) ([]byte, error) {
			s, err := sb.Read(ctx, &snixcastorepb.ReadBlobRequest{Digest: h})
			if err != nil {
				return nil, err
			}
			var buf bytes.Buffer
			for {
				c, err := s.Recv()
				if errors.Is(err, io.EOF) {
					return buf.Bytes(), nil
				}
				if err != nil {
					return nil, err
				}
				buf.Write(c.Data)
			}
		},
		stat: func(ctx context.Context, h []byte) error {
			_, err := sb.Stat(ctx, &snixcastorepb.StatBlobRequest{Digest: h})
			return err
		},
		putDirs: func(ctx context.Context, dirs []*castorepb.Directory) ([]byte, error) {
			s, err := sd.Put(ctx)
			if err != nil {
				return nil, err
			}
			for _, d := range dirs {
				if err := s.Send(toSnix(d)); err != nil {
					break
				}
			}
			r, err := s.CloseAndRecv()
			return r.GetRootDigest(), err
		},
		cutDirs: func(ctx context.Context, dirs []*castorepb.Directory) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := sd.Put(ctx)
			if err != nil {
				return err
			}
			for _, d := range dirs {
				s.Send(toSnix(d))
			}
			cancel()
			// RecvMsg, unlike CloseAndRecv, does not half-close the
			// stream first: the server sees a broken stream, not its end.
			return s.RecvMsg(new(emptypb.Empty))
		},
		getDirs: func(ctx context.Context, h []byte, recursive bool) ([]*castorepb.Directory, error) {
			s, err := sd.Get(ctx, &snixcastorepb.GetDirectoryRequest{ByWhat: &snixcastorepb.GetDirectoryRequest_Digest{Digest: h}, Recursive: recursive})
			if err != nil {
				return nil, err
			}
			var out []*castorepb.Directory
			for {
				d, err := s.Recv()
				if errors.Is(err, io.EOF) {
					return out, nil
				}
				if err != nil {
					return out, err
				}
				out = append(out, fromSnix(d))
			}
		},
	}}
}

func b3(data []byte) []byte { h := blake3.Sum256(data); return h[:] }

func wantCode(t *testing.T, what string, err error, code codes.Code, msg string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), msg) {
		t.Errorf("%s: %v, want %v containing %q", what, err, code, msg)
	}
}

func TestBlobService(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, f := range families(e.conn) {
		t.Run(f.name, func(t *testing.T) {
			// The empty blob and the fixture blobs.
			if err := f.stat(ctx, castore.EmptyDigest[:]); err != nil {
				t.Errorf("Stat(empty): %v", err)
			}
			if got, err := f.read(ctx, castore.EmptyDigest[:]); err != nil || len(got) != 0 {
				t.Errorf("Read(empty) = %q, %v", got, err)
			}
			if h, err := f.put(ctx, nil); err != nil || !bytes.Equal(h, castore.EmptyDigest[:]) {
				t.Errorf("Put(nothing) = %x, %v", h, err)
			}
			hello := []byte("Hello World!")
			h, err := f.put(ctx, [][]byte{hello[:5], hello[5:]})
			if err != nil || !bytes.Equal(h, unhex(t, "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c")) {
				t.Fatalf("Put(Hello World!) = %x, %v", h, err)
			}
			if got, err := f.read(ctx, h); err != nil || !bytes.Equal(got, hello) {
				t.Errorf("Read = %q, %v", got, err)
			}
			if h, err := f.put(ctx, [][]byte{{1}}); err != nil || !bytes.Equal(h, unhex(t, "48fc721fbbc172e0925fa27af1671de225ba927134802998b10a1568a188652b")) {
				t.Errorf("Put([1]) = %x, %v", h, err)
			}
			// A large blob: spooled, chunked on read.
			big := make([]byte, 20<<20+3)
			rand.Read(big)
			var chunks [][]byte
			for i := 0; i < len(big); i += 8 << 10 {
				chunks = append(chunks, big[i:min(i+8<<10, len(big))])
			}
			h, err = f.put(ctx, chunks)
			if err != nil || !bytes.Equal(h, b3(big)) {
				t.Fatalf("Put(20 MiB) = %x, %v", h, err)
			}
			if err := f.stat(ctx, h); err != nil {
				t.Errorf("Stat(20 MiB): %v", err)
			}
			if got, err := f.read(ctx, h); err != nil || !bytes.Equal(got, big) {
				t.Errorf("Read(20 MiB): %d bytes, %v", len(got), err)
			}
			// Absent and malformed.
			missing := b3([]byte("missing " + f.name))
			wantCode(t, "Stat(missing)", f.stat(ctx, missing), codes.NotFound, "not found")
			_, err = f.read(ctx, missing)
			wantCode(t, "Read(missing)", err, codes.NotFound, "not found")
			wantCode(t, "Stat(short)", f.stat(ctx, missing[:20]), codes.InvalidArgument, "invalid digest length")
			_, err = f.read(ctx, nil)
			wantCode(t, "Read(no digest)", err, codes.InvalidArgument, "invalid digest length")
			// A stream cut mid-way stores nothing.
			cut := make([]byte, 12<<20)
			rand.Read(cut)
			if err := f.cutBlob(ctx, [][]byte{cut[:6<<20], cut[6<<20:]}); err == nil {
				t.Errorf("cut Put succeeded")
			}
			small := []byte("cut short " + f.name)
			if err := f.cutBlob(ctx, [][]byte{small}); err == nil {
				t.Errorf("cut small Put succeeded")
			}
			time.Sleep(100 * time.Millisecond) // let the server see the cancellation
			for _, b := range [][]byte{cut, cut[:6<<20], small} {
				if err := f.stat(ctx, b3(b)); status.Code(err) != codes.NotFound {
					t.Errorf("blob of a cut stream: Stat = %v, want NotFound", err)
				}
			}
		})
	}
}

// TestBlobsSharedWithREAPI: a blob written by ByteStream with BLAKE3 is
// readable through BlobService, and one put through BlobService is
// readable through ByteStream and BatchReadBlobs.
func TestBlobsSharedWithREAPI(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	bs := bspb.NewByteStreamClient(e.conn)
	casc := repb.NewContentAddressableStorageClient(e.conn)
	f := families(e.conn)[0]
	data := make([]byte, 3<<20)
	rand.Read(data)
	d := digest.Compute(digest.BLAKE3, data)
	w, err := bs.Write(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Send(&bspb.WriteRequest{ResourceName: digest.WriteName("", "4f1b2b8e-0000-4000-8000-000000000001", d, repb.Compressor_IDENTITY), Data: data, FinishWrite: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	h := d.Hash()
	for _, fam := range families(e.conn) {
		if got, err := fam.read(ctx, h[:]); err != nil || !bytes.Equal(got, data) {
			t.Errorf("%s: BlobService.Read of a ByteStream blob: %d bytes, %v", fam.name, len(got), err)
		}
	}
	// And back.
	other := []byte("put through castore, read through REAPI")
	ph, err := f.put(ctx, [][]byte{other})
	if err != nil {
		t.Fatal(err)
	}
	od := digest.New(digest.BLAKE3, [32]byte(ph), int64(len(other)))
	r, err := casc.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{Digests: []*repb.Digest{od.Proto()}, DigestFunction: repb.DigestFunction_BLAKE3})
	if err != nil || len(r.Responses) != 1 || !bytes.Equal(r.Responses[0].Data, other) {
		t.Errorf("BatchReadBlobs of a castore blob: %v %v", r, err)
	}
	rs, err := bs.Read(ctx, &bspb.ReadRequest{ResourceName: digest.ReadName("", od, repb.Compressor_IDENTITY)})
	if err != nil {
		t.Fatal(err)
	}
	c, err := rs.Recv()
	if err != nil || !bytes.Equal(c.Data, other) {
		t.Errorf("ByteStream.Read of a castore blob: %v", err)
	}
}

// tree is DIRECTORY_COMPLICATED with its child, leaves first.
func tree(t testing.TB) []*castorepb.Directory {
	return []*castorepb.Directory{withKeep, complicated(t, 2)}
}

func digestOf(t testing.TB, d *castorepb.Directory) []byte {
	h, _, err := castore.Digest(d)
	if err != nil {
		t.Fatal(err)
	}
	return h[:]
}

func TestDirectoryService(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, f := range families(e.conn) {
		t.Run(f.name, func(t *testing.T) {
			// The empty directory exists.
			if ds, err := f.getDirs(ctx, castore.EmptyDigest[:], false); err != nil || len(ds) != 1 || len(digestOf(t, ds[0])) != 32 || !bytes.Equal(digestOf(t, ds[0]), castore.EmptyDigest[:]) {
				t.Errorf("Get(empty) = %v, %v", ds, err)
			}
			root, err := f.putDirs(ctx, tree(t))
			if err != nil || !bytes.Equal(root, unhex(t, "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb")) {
				t.Fatalf("Put(DIRECTORY_COMPLICATED) = %x, %v", root, err)
			}
			ds, err := f.getDirs(ctx, root, true)
			if err != nil || len(ds) != 2 || !bytes.Equal(digestOf(t, ds[0]), root) || !bytes.Equal(digestOf(t, ds[1]), digestOf(t, withKeep)) {
				t.Errorf("Get(recursive) = %v, %v", ds, err)
			}
			ds, err = f.getDirs(ctx, digestOf(t, withKeep), false)
			if err != nil || len(ds) != 1 || !proto.Equal(ds[0], withKeep) {
				t.Errorf("Get(WITH_KEEP) = %v, %v", ds, err)
			}
			// Missing: non-recursive NotFound, recursive an empty stream.
			missing := b3([]byte("no such directory"))
			_, err = f.getDirs(ctx, missing, false)
			wantCode(t, "Get(missing)", err, codes.NotFound, "not found")
			if ds, err := f.getDirs(ctx, missing, true); err != nil || len(ds) != 0 {
				t.Errorf("Get(missing, recursive) = %v, %v; want an empty stream", ds, err)
			}
			_, err = f.getDirs(ctx, missing[:3], true)
			wantCode(t, "Get(short digest)", err, codes.InvalidArgument, "invalid digest length")
		})
	}
}

// TestDirectoryGetOrder: breadth first, root first, each digest once,
// every directory after one that refers to it.
func TestDirectoryGetOrder(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	f := families(e.conn)[0]
	leaf := &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte("f"), Digest: b3([]byte("x")), Size: 1}}}
	lh := digestOf(t, leaf)
	mid := func(name string) *castorepb.Directory {
		return &castorepb.Directory{
			Directories: []*castorepb.DirectoryNode{{Name: []byte("leaf"), Digest: lh, Size: 2}},
			Symlinks:    []*castorepb.SymlinkNode{{Name: []byte(name), Target: []byte("t")}},
		}
	}
	a, b := mid("a"), mid("b")
	root := &castorepb.Directory{Directories: []*castorepb.DirectoryNode{
		{Name: []byte("a"), Digest: digestOf(t, a), Size: 6},
		{Name: []byte("b"), Digest: digestOf(t, b), Size: 6},
		{Name: []byte("c"), Digest: digestOf(t, a), Size: 6},
		{Name: []byte("l"), Digest: lh, Size: 2},
	}}
	rh, err := f.putDirs(ctx, []*castorepb.Directory{leaf, a, b, root})
	if err != nil {
		t.Fatal(err)
	}
	ds, err := f.getDirs(ctx, rh, true)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	names := map[string]string{string(rh): "root", string(digestOf(t, a)): "a", string(digestOf(t, b)): "b", string(lh): "leaf"}
	for _, d := range ds {
		got = append(got, names[string(digestOf(t, d))])
	}
	if strings.Join(got, " ") != "root a b leaf" {
		t.Errorf("order %v, want root a b leaf", got)
	}
}

// TestDirectoryPutInvalid: bad closures are INVALID_ARGUMENT with the
// reason, and nothing of them is stored.
func TestDirectoryPutInvalid(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	for _, f := range families(e.conn) {
		t.Run(f.name, func(t *testing.T) {
			uniq := []byte("unique-" + f.name)
			leaf := &castorepb.Directory{Symlinks: []*castorepb.SymlinkNode{{Name: uniq, Target: []byte("x")}}}
			ref := func(d *castorepb.Directory) *castorepb.Directory {
				return &castorepb.Directory{Directories: []*castorepb.DirectoryNode{{Name: []byte("sub"), Digest: digestOf(t, d), Size: 2}}}
			}
			unsorted := &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte("b"), Digest: castore.EmptyDigest[:]}, {Name: []byte("a"), Digest: castore.EmptyDigest[:]}}}
			for _, tc := range []struct {
				name string
				dirs []*castorepb.Directory
				msg  string
			}{
				{"missing child", []*castorepb.Directory{ref(leaf)}, "neither sent before nor stored"},
				{"unsorted", []*castorepb.Directory{leaf, unsorted}, "wrong sorting"},
				{"bad name", []*castorepb.Directory{leaf, {Files: []*castorepb.FileNode{{Name: []byte("a/b"), Digest: castore.EmptyDigest[:]}}}}, "contains '/'"},
				{"dotdot", []*castorepb.Directory{leaf, {Symlinks: []*castorepb.SymlinkNode{{Name: []byte(".."), Target: []byte("x")}}}}, `name ".."`},
				{"wrong digest length", []*castorepb.Directory{leaf, {Files: []*castorepb.FileNode{{Name: []byte("a"), Digest: []byte{1, 2}}}}}, "invalid digest length"},
				{"disconnected", []*castorepb.Directory{leaf, {}}, "not below the root"},
				{"empty stream", nil, "no directories"},
			} {
				_, err := f.putDirs(ctx, tc.dirs)
				wantCode(t, tc.name, err, codes.InvalidArgument, tc.msg)
			}
			if _, err := f.getDirs(ctx, digestOf(t, leaf), false); status.Code(err) != codes.NotFound {
				t.Errorf("leaf of rejected closures (before cut): Get = %v, want NotFound", err)
			}
			// A cut stream stores nothing either.
			if err := f.cutDirs(ctx, []*castorepb.Directory{leaf}); err == nil {
				t.Errorf("cut Put succeeded")
			}
			time.Sleep(100 * time.Millisecond)
			if _, err := f.getDirs(ctx, digestOf(t, leaf), false); status.Code(err) != codes.NotFound {
				t.Errorf("leaf of rejected closures: Get = %v, want NotFound", err)
			}
			// A child already stored need not be sent again.
			if _, err := f.putDirs(ctx, []*castorepb.Directory{leaf}); err != nil {
				t.Fatal(err)
			}
			if _, err := f.putDirs(ctx, []*castorepb.Directory{ref(leaf)}); err != nil {
				t.Errorf("Put with a stored child: %v", err)
			}
			// Sizes are accepted as sent (the proto comment's formula too).
			if _, err := f.putDirs(ctx, []*castorepb.Directory{withKeep, complicated(t, 1)}); err != nil {
				t.Errorf("Put with size 1: %v", err)
			}
		})
	}
}

// TestREAPIMapping: castore -> REAPI -> castore gives the same tree, the
// REAPI tree is in the CAS, and the REAPI files are the castore blobs.
func TestREAPIMapping(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	f := families(e.conn)[0]
	content := []byte("#!/bin/sh\necho hi\n")
	fh, err := f.put(ctx, [][]byte{content})
	if err != nil {
		t.Fatal(err)
	}
	sub := &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte("hi"), Digest: fh, Size: uint64(len(content)), Executable: true}}}
	root := &castorepb.Directory{
		Directories: []*castorepb.DirectoryNode{{Name: []byte("bin"), Digest: digestOf(t, sub), Size: 2}, {Name: []byte("empty"), Digest: castore.EmptyDigest[:]}},
		Files:       []*castorepb.FileNode{{Name: []byte(".keep"), Digest: castore.EmptyDigest[:]}},
		Symlinks:    []*castorepb.SymlinkNode{{Name: []byte("lib"), Target: []byte("bin")}},
	}
	rh, err := f.putDirs(ctx, []*castorepb.Directory{sub, root})
	if err != nil {
		t.Fatal(err)
	}
	rd, err := e.st.ToREAPI(ctx, [32]byte(rh))
	if err != nil {
		t.Fatal(err)
	}
	data, err := blobstore.GetBytes(ctx, e.cas, rd, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var top repb.Directory
	if err := proto.Unmarshal(data, &top); err != nil {
		t.Fatal(err)
	}
	if len(top.Directories) != 2 || len(top.Files) != 1 || len(top.Symlinks) != 1 || top.Symlinks[0].Target != "bin" {
		t.Fatalf("REAPI root %v", &top)
	}
	bin, err := digest.FromProto(digest.BLAKE3, top.Directories[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	data, _ = blobstore.GetBytes(ctx, e.cas, bin, 1<<20)
	var bd repb.Directory
	proto.Unmarshal(data, &bd)
	fd, _ := digest.FromProto(digest.BLAKE3, bd.Files[0].Digest)
	if got, err := blobstore.GetBytes(ctx, e.cas, fd, 1<<20); err != nil || !bytes.Equal(got, content) || !bd.Files[0].IsExecutable {
		t.Errorf("REAPI file: %q %v", got, err)
	}
	back, size, err := e.st.FromREAPI(ctx, rd)
	if err != nil || !bytes.Equal(back[:], rh) || size != 2*4+2 {
		t.Errorf("FromREAPI = %x (size %d), %v; want %x (size 10)", back, size, err, rh)
	}
	// A second round is served from the recorded mapping.
	if again, err := e.st.ToREAPI(ctx, [32]byte(rh)); err != nil || again != rd {
		t.Errorf("ToREAPI again = %v, %v", again, err)
	}
	if _, err := e.st.ToREAPI(ctx, [32]byte(b3([]byte("nope")))); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("ToREAPI(missing) = %v, want FailedPrecondition", err)
	}
}

// TestRegisterAsNamesMethods: interceptors see the method the client
// called, also for the family registered with RegisterAs.
func TestRegisterAsNamesMethods(t *testing.T) {
	cas := blobstore.NewMemory(blobstore.CAS, 1<<20)
	st := castore.NewStore(cas, blobstore.NewMemory(blobstore.AC, 1<<20), t.TempDir())
	seen := make(chan string, 4)
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		seen <- info.FullMethod
		return h(ctx, req)
	}))
	castore.Register(srv, st)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx := context.Background()
	if _, err := snixcastorepb.NewBlobServiceClient(conn).Stat(ctx, &snixcastorepb.StatBlobRequest{Digest: castore.EmptyDigest[:]}); err != nil {
		t.Fatal(err)
	}
	if _, err := castorepb.NewBlobServiceClient(conn).Stat(ctx, &castorepb.StatBlobRequest{Digest: castore.EmptyDigest[:]}); err != nil {
		t.Fatal(err)
	}
	if a, b := <-seen, <-seen; a != "/snix.castore.v1.BlobService/Stat" || b != "/tvix.castore.v1.BlobService/Stat" {
		t.Errorf("interceptor saw %s and %s", a, b)
	}
}

// TestConcurrentLargeReads reads large blobs from many BlobService streams
// at once, through both client families. Reads send the store's direct-I/O
// buffers without a copy, so a buffer handed back to the store too early
// would show as wrong bytes.
func TestConcurrentLargeReads(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	fams := families(e.conn)
	var blobs, hashes [][]byte
	for i := range 3 {
		data := make([]byte, 5<<20+i*4099)
		for j := range data {
			data[j] = byte(j*7 + i + j>>13)
		}
		h, err := fams[0].put(ctx, [][]byte{data})
		if err != nil {
			t.Fatal(err)
		}
		blobs, hashes = append(blobs, data), append(hashes, h)
	}
	errs := make(chan error, 24)
	for g := range 24 {
		go func() {
			f, i := fams[g%len(fams)], g%len(blobs)
			got, err := f.read(ctx, hashes[i])
			if err == nil && !bytes.Equal(got, blobs[i]) {
				err = fmt.Errorf("%s: blob %d: read %d bytes that differ from the %d put", f.name, i, len(got), len(blobs[i]))
			}
			errs <- err
		}()
	}
	for range 24 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
