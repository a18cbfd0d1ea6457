package pathinfo

import (
	"context"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

const (
	pathA = "/nix/store/s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox"
	pathB = "/nix/store/d5w9lzs3xm10036lkyps85s6bpk0xkyl-trivial"
	drv   = "/nix/store/x72kdl72irdhls3jglkpi80ylayrccvj-trivial.drv"
)

func info(t *testing.T, cas blobstore.BlobAccess, p string, refs ...string) *storepb.PathInfo {
	t.Helper()
	data := []byte("contents of " + p)
	d := digest.Compute(digest.BLAKE3, data)
	if cas != nil {
		if err := cas.Put(context.Background(), d, strings.NewReader(string(data))); err != nil {
			t.Fatal(err)
		}
	}
	return &storepb.PathInfo{
		StorePath:  p,
		Node:       &storepb.Node{Kind: storepb.Node_FILE, DigestFunction: "blake3", Digest: DigestProto(d)},
		NarSha256:  make([]byte, 32),
		NarSize:    120,
		References: refs,
		Deriver:    drv,
	}
}

// stores returns the blob-backed store and a gRPC client of it.
func stores(t *testing.T) (blobstore.BlobAccess, map[string]Store) {
	cas := blobstore.NewMemory(blobstore.CAS, 1<<20)
	s := NewBlobStore(blobstore.NewMemory(blobstore.AC, 1<<20), cas)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	storepb.RegisterStoreServer(srv, NewServer(s))
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return cas, map[string]Store{"blob": s, "grpc": NewClient(conn)}
}

func TestRoundTrip(t *testing.T) {
	cas, ss := stores(t)
	ctx := context.Background()
	for name, s := range ss {
		t.Run(name, func(t *testing.T) {
			a, b := info(t, cas, pathA), info(t, cas, pathB, pathB, pathA)
			if err := s.Put(ctx, []*storepb.PathInfo{a, b}); err != nil {
				t.Fatal(err)
			}
			got, err := s.Get(ctx, []string{pathA, pathB, "/nix/store/00000000000000000000000000000000-missing"})
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 2 || got[pathB].GetReferences()[0] != pathB || got[pathA].GetDeriver() != drv {
				t.Fatalf("Get = %v", got)
			}
			byHash, err := s.GetByHash(ctx, HashPart(pathB))
			if err != nil || byHash.StorePath != pathB {
				t.Fatalf("GetByHash = %v, %v", byHash, err)
			}
			if _, err := s.GetByHash(ctx, "00000000000000000000000000000000"); status.Code(err) != codes.NotFound {
				t.Errorf("GetByHash(unknown) = %v, want NotFound", err)
			}
			if _, err := s.GetByHash(ctx, "not-a-hash"); status.Code(err) != codes.InvalidArgument {
				t.Errorf("GetByHash(bad) = %v, want InvalidArgument", err)
			}
			if _, err := s.GetBuild(ctx, "/nix/store/00000000000000000000000000000000-never.drv"); status.Code(err) != codes.NotFound {
				t.Errorf("GetBuild(unknown) = %v, want NotFound", err)
			}
			rec := &storepb.Build{DrvPath: drv, Outputs: map[string]string{"out": pathB}, ExitCode: 3}
			if err := s.PutBuild(ctx, rec); err != nil {
				t.Fatal(err)
			}
			if b, err := s.GetBuild(ctx, drv); err != nil || b.ExitCode != 3 || b.Outputs["out"] != pathB {
				t.Fatalf("GetBuild = %v, %v", b, err)
			}
		})
	}
}

func TestPutValidates(t *testing.T) {
	cas, ss := stores(t)
	ctx := context.Background()
	for name, s := range ss {
		t.Run(name, func(t *testing.T) {
			for _, c := range []struct {
				name string
				mod  func(*storepb.PathInfo)
				code codes.Code
			}{
				{"not in the store", func(i *storepb.PathInfo) { i.StorePath = "/tmp/x" }, codes.InvalidArgument},
				{"bad hash part", func(i *storepb.PathInfo) { i.StorePath = "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x" }, codes.InvalidArgument},
				{"short NAR hash", func(i *storepb.PathInfo) { i.NarSha256 = []byte{1} }, codes.InvalidArgument},
				{"unsorted references", func(i *storepb.PathInfo) { i.References = []string{pathA, pathB} }, codes.InvalidArgument},
				{"bad reference", func(i *storepb.PathInfo) { i.References = []string{"/nix/store/x"} }, codes.InvalidArgument},
				{"deriver not a drv", func(i *storepb.PathInfo) { i.Deriver = pathA }, codes.InvalidArgument},
				{"no node", func(i *storepb.PathInfo) { i.Node = nil }, codes.InvalidArgument},
				{"unknown digest function", func(i *storepb.PathInfo) { i.Node.DigestFunction = "md5" }, codes.InvalidArgument},
				{"tree not in the CAS", func(i *storepb.PathInfo) {
					i.Node.Digest = DigestProto(digest.Compute(digest.BLAKE3, []byte("never stored")))
				}, codes.FailedPrecondition},
			} {
				i := info(t, cas, pathA)
				c.mod(i)
				if err := s.Put(ctx, []*storepb.PathInfo{i}); status.Code(err) != c.code {
					t.Errorf("%s: Put = %v, want %v", c.name, err, c.code)
				}
			}
			// Nothing invalid became visible.
			if got, err := s.Get(ctx, []string{pathA}); err != nil || len(got) != 0 {
				t.Errorf("Get after failed Puts = %v, %v", got, err)
			}
		})
	}
}
