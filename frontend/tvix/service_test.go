package tvix_test

import (
	"context"
	"crypto/sha256"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/zeebo/blake3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/castore"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/frontend/tvix"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	snixstorepb "tvixfarm/proto/snix/store/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
	tvixstorepb "tvixfarm/proto/tvix/store/v1"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

type env struct {
	paths pathinfo.Store
	conn  *grpc.ClientConn
	tvix  tvixstorepb.PathInfoServiceClient
	snix  snixstorepb.PathInfoServiceClient
	blobs castorepb.BlobServiceClient
	dirs  castorepb.DirectoryServiceClient
}

func newEnv(t *testing.T) *env {
	t.Helper()
	cas, err := blobstore.NewDisk(blobstore.CAS, t.TempDir(), blobstore.DiskOptions{MaxSize: 1 << 30, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cas.(io.Closer).Close() })
	ac := blobstore.NewMemory(blobstore.AC, 64<<20)
	paths, err := pathinfo.NewIndexed(pathinfo.NewBlobStore(ac, cas), filepath.Join(t.TempDir(), "pathinfo.index"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { paths.Close() })
	srv := grpc.NewServer()
	tvix.Register(srv, paths, castore.NewStore(cas, ac, t.TempDir()), ac)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &env{paths: paths, conn: conn, tvix: tvixstorepb.NewPathInfoServiceClient(conn), snix: snixstorepb.NewPathInfoServiceClient(conn),
		blobs: castorepb.NewBlobServiceClient(conn), dirs: castorepb.NewDirectoryServiceClient(conn)}
}

func (e *env) putBlob(t *testing.T, data []byte) []byte {
	t.Helper()
	s, err := e.blobs.Put(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	s.Send(&castorepb.BlobChunk{Data: data})
	r, err := s.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	return r.Digest
}

func (e *env) putDirs(t *testing.T, dirs ...*castorepb.Directory) []byte {
	t.Helper()
	s, err := e.dirs.Put(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		s.Send(d)
	}
	r, err := s.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	return r.RootDigest
}

// narOfHello is the NAR of a directory holding one file "hello" with
// contents "hi\n", as nix-store --dump writes it.
func narOfHello() []byte { return narOf("hello") }

// narOf is the NAR of a directory holding one file named name with
// contents "hi\n".
func narOf(name string) []byte {
	var b []byte
	str := func(s string) {
		var n [8]byte
		for i := 0; i < 8; i++ {
			n[i] = byte(uint64(len(s)) >> (8 * i))
		}
		b = append(b, n[:]...)
		b = append(b, s...)
		for len(b)%8 != 0 {
			b = append(b, 0)
		}
	}
	for _, s := range []string{"nix-archive-1", "(", "type", "directory", "entry", "(", "name", name, "node", "(", "type", "regular", "contents", "hi\n", ")", ")", ")"} {
		str(s)
	}
	return b
}

const (
	path1 = "00bgd045z0d4icpbc2yyz4gx48ak44la-hello"
	ref1  = "01bgd045z0d4icpbc2yyz4gx48ak44la-dep"
)

func hashOf(b string) []byte {
	h, err := nixbase32.DecodeString(b[:32])
	if err != nil {
		panic(err)
	}
	return h
}

func (e *env) helloInfo(t *testing.T) *tvixstorepb.PathInfo {
	fh := e.putBlob(t, []byte("hi\n"))
	dir := &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte("hello"), Digest: fh, Size: 3}}}
	root := e.putDirs(t, dir)
	sum := sha256.Sum256(narOfHello())
	return &tvixstorepb.PathInfo{
		Node:       &castorepb.Node{Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Name: []byte(path1), Digest: root, Size: 2}}},
		References: [][]byte{hashOf(ref1)},
		Narinfo: &tvixstorepb.NARInfo{
			NarSize: uint64(len(narOfHello())), NarSha256: sum[:],
			ReferenceNames: []string{ref1},
			Signatures:     []*tvixstorepb.NARInfo_Signature{{Name: "cache-1", Data: make([]byte, 64)}},
			Deriver:        &tvixstorepb.StorePath{Name: "hello", Digest: hashOf(ref1)},
			Ca:             &tvixstorepb.NARInfo_CA{Type: tvixstorepb.NARInfo_CA_NAR_SHA256, Digest: sum[:]},
		},
	}
}

func TestPathInfoService(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	pi := e.helloInfo(t)
	got, err := e.tvix.Put(ctx, pi)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got, pi) {
		t.Errorf("Put returned\n%v\nwant\n%v", got, pi)
	}
	// Both families see it.
	g, err := e.tvix.Get(ctx, &tvixstorepb.GetPathInfoRequest{ByWhat: &tvixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: hashOf(path1)}})
	if err != nil || !proto.Equal(g, pi) {
		t.Errorf("tvix Get = %v, %v", g, err)
	}
	sg, err := e.snix.Get(ctx, &snixstorepb.GetPathInfoRequest{ByWhat: &snixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: hashOf(path1)}})
	if err != nil {
		t.Fatal(err)
	}
	if a, _ := proto.Marshal(sg); !strings.Contains(string(a), path1) {
		t.Errorf("snix Get = %v", sg)
	}
	// It is a farm path info with a REAPI tree.
	infos, err := e.paths.Get(ctx, []string{"/nix/store/" + path1})
	fi := infos["/nix/store/"+path1]
	if err != nil || fi == nil || fi.Node.Kind != storepb.Node_DIRECTORY || fi.Node.DigestFunction != "blake3" ||
		len(fi.References) != 1 || fi.References[0] != "/nix/store/"+ref1 || fi.Deriver != "/nix/store/"+ref1[:32]+"-hello.drv" ||
		!strings.HasPrefix(fi.Ca, "fixed:r:sha256:") || len(fi.Signatures) != 1 {
		t.Errorf("farm path info %v, %v", fi, err)
	}
	// CalculateNAR, both families.
	anon := castore.WithName(pi.Node, nil)
	for _, calc := range []func() (*tvixstorepb.CalculateNARResponse, error){
		func() (*tvixstorepb.CalculateNARResponse, error) { return e.tvix.CalculateNAR(ctx, anon) },
		func() (*tvixstorepb.CalculateNARResponse, error) {
			var sn snixcastorepb.Entry
			b, _ := proto.Marshal(anon)
			proto.Unmarshal(b, &sn)
			r, err := e.snix.CalculateNAR(ctx, &sn)
			if err != nil {
				return nil, err
			}
			return &tvixstorepb.CalculateNARResponse{NarSize: r.NarSize, NarSha256: r.NarSha256}, nil
		},
	} {
		r, err := calc()
		if err != nil || r.NarSize != pi.Narinfo.NarSize || string(r.NarSha256) != string(pi.Narinfo.NarSha256) {
			t.Errorf("CalculateNAR = %v, %v", r, err)
		}
	}
	// A file root.
	fileNode := &castorepb.Node{Node: &castorepb.Node_File{File: &castorepb.FileNode{Digest: e.putBlob(t, []byte("x")), Size: 1, Executable: true}}}
	if r, err := e.tvix.CalculateNAR(ctx, fileNode); err != nil || r.NarSize != 152 {
		t.Errorf("CalculateNAR(file) = %v, %v", r, err)
	}
	// A name that is not UTF-8: rendered from the castore tree.
	odd := string([]byte{'a', 0xff})
	oddRoot := e.putDirs(t, &castorepb.Directory{Files: []*castorepb.FileNode{{Name: []byte(odd), Digest: e.putBlob(t, []byte("hi\n")), Size: 3}}})
	wantSum := sha256.Sum256(narOf(odd))
	if r, err := e.tvix.CalculateNAR(ctx, &castorepb.Node{Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Digest: oddRoot, Size: 2}}}); err != nil ||
		r.NarSize != uint64(len(narOf(odd))) || string(r.NarSha256) != string(wantSum[:]) {
		t.Errorf("CalculateNAR(non-UTF-8 name) = %v, %v", r, err)
	}
	// List: the put path, from both families.
	ls, err := e.tvix.List(ctx, &tvixstorepb.ListPathInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var listed []*tvixstorepb.PathInfo
	for {
		li, err := ls.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		listed = append(listed, li)
	}
	if len(listed) != 1 || !proto.Equal(listed[0], pi) {
		t.Errorf("List = %v, want the put path info", listed)
	}
	sls, err := e.snix.List(ctx, &snixstorepb.ListPathInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if si, err := sls.Recv(); err != nil || !strings.Contains(si.String(), path1) {
		t.Errorf("snix List: %v, %v", si, err)
	}
	// A store that cannot be enumerated answers UNIMPLEMENTED.
	plain := tvix.NewService(pathinfo.NewBlobStore(blobstore.NewMemory(blobstore.AC, 1<<20), nil), nil, nil)
	if err := plain.List(&tvixstorepb.ListPathInfoRequest{}, nil); status.Code(err) != codes.Unimplemented {
		t.Errorf("List of a plain store: %v, want Unimplemented", err)
	}
}

func TestPathInfoServiceInvalid(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	want := func(what string, err error, code codes.Code, msg string) {
		t.Helper()
		if status.Code(err) != code || !strings.Contains(status.Convert(err).Message(), msg) {
			t.Errorf("%s: %v, want %v with %q", what, err, code, msg)
		}
	}
	_, err := e.tvix.Get(ctx, &tvixstorepb.GetPathInfoRequest{ByWhat: &tvixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: hashOf(path1)}})
	want("Get(absent)", err, codes.NotFound, "no store path")
	_, err = e.tvix.Get(ctx, &tvixstorepb.GetPathInfoRequest{ByWhat: &tvixstorepb.GetPathInfoRequest_ByOutputHash{ByOutputHash: []byte{1, 2}}})
	want("Get(short)", err, codes.InvalidArgument, "invalid digest length")
	_, err = e.tvix.Get(ctx, &tvixstorepb.GetPathInfoRequest{})
	want("Get(unset)", err, codes.InvalidArgument, "by_what")
	_, err = e.tvix.CalculateNAR(ctx, &castorepb.Node{Node: &castorepb.Node_Symlink{Symlink: &castorepb.SymlinkNode{Name: []byte("x"), Target: []byte("y")}}})
	want("CalculateNAR(named)", err, codes.InvalidArgument, "anonymous")
	_, err = e.tvix.CalculateNAR(ctx, &castorepb.Node{})
	want("CalculateNAR(unset)", err, codes.InvalidArgument, "no node set")
	missing := blake3.Sum256([]byte("missing"))
	_, err = e.tvix.CalculateNAR(ctx, &castorepb.Node{Node: &castorepb.Node_Directory{Directory: &castorepb.DirectoryNode{Digest: missing[:], Size: 2}}})
	want("CalculateNAR(missing dir)", err, codes.FailedPrecondition, "not stored")
	_, err = e.tvix.CalculateNAR(ctx, &castorepb.Node{Node: &castorepb.Node_File{File: &castorepb.FileNode{Digest: missing[:], Size: 7}}})
	want("CalculateNAR(missing blob)", err, codes.FailedPrecondition, "upload blobs")

	base := e.helloInfo(t)
	for _, tc := range []struct {
		name   string
		mutate func(p *tvixstorepb.PathInfo)
		code   codes.Code
		msg    string
	}{
		{"no narinfo", func(p *tvixstorepb.PathInfo) { p.Narinfo = nil }, codes.InvalidArgument, "narinfo is missing"},
		{"short reference", func(p *tvixstorepb.PathInfo) { p.References[0] = p.References[0][:19] }, codes.InvalidArgument, "invalid digest length 19"},
		{"reference count", func(p *tvixstorepb.PathInfo) { p.Narinfo.ReferenceNames = nil }, codes.InvalidArgument, "1 references but 0 reference names"},
		{"reference mismatch", func(p *tvixstorepb.PathInfo) { p.Narinfo.ReferenceNames[0] = path1 }, codes.InvalidArgument, "does not match"},
		{"no node", func(p *tvixstorepb.PathInfo) { p.Node = nil }, codes.InvalidArgument, "node is missing"},
		{"bad node name", func(p *tvixstorepb.PathInfo) { p.Node = castore.WithName(p.Node, []byte("hello")) }, codes.InvalidArgument, "not a store path basename"},
		{"bad name chars", func(p *tvixstorepb.PathInfo) { p.Node = castore.WithName(p.Node, []byte(path1[:33]+"a b")) }, codes.InvalidArgument, "invalid character"},
		{"anonymous node", func(p *tvixstorepb.PathInfo) { p.Node = castore.WithName(p.Node, nil) }, codes.InvalidArgument, "empty name"},
		{"short nar hash", func(p *tvixstorepb.PathInfo) { p.Narinfo.NarSha256 = p.Narinfo.NarSha256[:5] }, codes.InvalidArgument, "NAR SHA-256 length 5"},
		{"wrong nar hash", func(p *tvixstorepb.PathInfo) { p.Narinfo.NarSha256 = make([]byte, 32) }, codes.InvalidArgument, "the tree's NAR is"},
		{"wrong nar size", func(p *tvixstorepb.PathInfo) { p.Narinfo.NarSize++ }, codes.InvalidArgument, "the tree's NAR is"},
		{"bad deriver", func(p *tvixstorepb.PathInfo) { p.Narinfo.Deriver.Digest = nil }, codes.InvalidArgument, "deriver: invalid digest length 0"},
		{"bad signature", func(p *tvixstorepb.PathInfo) { p.Narinfo.Signatures[0].Data = []byte{1} }, codes.InvalidArgument, "1 bytes, want 64"},
		{"bad ca", func(p *tvixstorepb.PathInfo) { p.Narinfo.Ca.Digest = p.Narinfo.Ca.Digest[:20] }, codes.InvalidArgument, "CA digest of 20 bytes"},
		{"unknown ca", func(p *tvixstorepb.PathInfo) { p.Narinfo.Ca.Type = 42 }, codes.InvalidArgument, "unknown CA hash type"},
		{"short dir digest", func(p *tvixstorepb.PathInfo) { p.Node.GetDirectory().Digest = []byte{1} }, codes.InvalidArgument, "invalid digest length 1"},
		{"tree not stored", func(p *tvixstorepb.PathInfo) {
			p.Node.GetDirectory().Digest = missing[:]
		}, codes.FailedPrecondition, "not stored"},
	} {
		p := proto.CloneOf(base)
		tc.mutate(p)
		_, err := e.tvix.Put(ctx, p)
		want(tc.name, err, tc.code, tc.msg)
	}
	// Nothing was stored.
	if infos, err := e.paths.Get(ctx, []string{"/nix/store/" + path1}); err != nil || len(infos) != 0 {
		t.Errorf("after rejected Puts: %v, %v", infos, err)
	}
}
