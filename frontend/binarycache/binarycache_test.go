package binarycache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/binarycache"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

const (
	testPath = "/nix/store/d5w9lzs3xm10036lkyps85s6bpk0xkyl-tree"
	refA     = "/nix/store/s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox"
	testDrv  = "/nix/store/x72kdl72irdhls3jglkpi80ylayrccvj-tree.drv"
	// unknownHash is a valid hash part no test registers.
	unknownHash = "00000000000000000000000000000000"
)

// fixture is a cache with one registered tree (testPath, referring to
// itself and refA) and a build record of testDrv with a log.
type fixture struct {
	cas   blobstore.BlobAccess
	paths pathinfo.Store
	info  *storepb.PathInfo
	nar   []byte // the tree's NAR, from nar.Dump
	log   string
	key   signature.SecretKey
	other signature.SecretKey // signed info before it was stored
}

// writeTree writes a small tree with a subdirectory, an executable, a
// symlink and, if big > 0, a file of big bytes (streamed by nar.Write).
func writeTree(t testing.TB, dir string, big int) {
	t.Helper()
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "bin", "hello"), []byte("#!/bin/sh\necho hello "+refA+"\n"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "README"), []byte("self: "+testPath+"\n"), 0o644))
	must(os.Symlink("bin/hello", filepath.Join(dir, "link")))
	must(os.MkdirAll(filepath.Join(dir, "empty"), 0o755))
	if big > 0 {
		data := make([]byte, big)
		for i := range data {
			data[i] = byte(i * 7 / 3)
		}
		must(os.WriteFile(filepath.Join(dir, "big"), data, 0o644))
	}
}

// register ingests dir into cas and stores its path info as p.
func register(t testing.TB, cas blobstore.BlobAccess, paths pathinfo.Store, dir, p string, refs []string, sigs []string) (*storepb.PathInfo, []byte) {
	t.Helper()
	ctx := context.Background()
	ing, err := nar.Ingest(ctx, dir, digest.BLAKE3)
	if err != nil {
		t.Fatal(err)
	}
	if err := nar.Upload(ctx, cas, ing); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := nar.Dump(dir, &buf); err != nil {
		t.Fatal(err)
	}
	d := ing.Node.Digest
	kind := map[nar.Type]storepb.Node_Kind{nar.Directory: storepb.Node_DIRECTORY, nar.Regular: storepb.Node_FILE, nar.Symlink: storepb.Node_SYMLINK}[ing.Node.Type]
	info := &storepb.PathInfo{
		StorePath:  p,
		Node:       &storepb.Node{Kind: kind, DigestFunction: "blake3", Digest: pathinfo.DigestProto(d), Executable: ing.Node.Executable, Target: ing.Node.Target},
		NarSha256:  ing.NarHash[:],
		NarSize:    ing.NarSize,
		References: refs,
		Deriver:    testDrv,
		Signatures: sigs,
	}
	if err := paths.Put(ctx, []*storepb.PathInfo{info}); err != nil {
		t.Fatal(err)
	}
	return info, buf.Bytes()
}

func newFixture(t testing.TB, big int) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{cas: blobstore.NewMemory(blobstore.CAS, 1<<40)}
	f.paths = pathinfo.NewBlobStore(blobstore.NewMemory(blobstore.AC, 1<<30), nil)
	var err error
	if f.key, _, err = signature.GenerateKeypair("farm-test-1", nil); err != nil {
		t.Fatal(err)
	}
	if f.other, _, err = signature.GenerateKeypair("other-1", nil); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "tree")
	writeTree(t, dir, big)
	refs := []string{testPath, refA} // sorted
	// A signature by another key, made before the path came to the farm,
	// and a malformed one.
	info, narData := register(t, f.cas, f.paths, dir, testPath, refs, nil)
	ni, err := binarycache.NarInfo(info, nil)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := f.other.Sign(nil, ni.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	info.Signatures = []string{sig.String(), "garbage"}
	if err := f.paths.Put(ctx, []*storepb.PathInfo{info}); err != nil {
		t.Fatal(err)
	}
	f.info, f.nar = info, narData

	f.log = "building tree\nhello " + testPath + "\n"
	ld := digest.Compute(digest.BLAKE3, []byte(f.log))
	if err := f.cas.Put(ctx, ld, strings.NewReader(f.log)); err != nil {
		t.Fatal(err)
	}
	if err := f.paths.PutBuild(ctx, &storepb.Build{DrvPath: testDrv, Outputs: map[string]string{"out": testPath}, Log: pathinfo.DigestProto(ld), LogDigestFunction: "blake3"}); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) server(t testing.TB, key *signature.SecretKey) *httptest.Server {
	srv := httptest.NewServer(binarycache.New(f.paths, f.cas, binarycache.Options{Key: key, Priority: 40, WantMassQuery: true}))
	t.Cleanup(srv.Close)
	return srv
}

func get(t testing.TB, method, url string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, url, err)
	}
	return resp, body
}

func TestNarInfo(t *testing.T) {
	f := newFixture(t, 0)
	pub := f.key.ToPublicKey()
	hash := pathinfo.HashPart(testPath)
	for _, signed := range []bool{true, false} {
		t.Run(fmt.Sprintf("signed=%v", signed), func(t *testing.T) {
			var key *signature.SecretKey
			if signed {
				key = &f.key
			}
			srv := f.server(t, key)
			resp, body := get(t, "GET", srv.URL+"/"+hash+".narinfo")
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/x-nix-narinfo" {
				t.Fatalf("%s %s: %s", resp.Status, resp.Header.Get("Content-Type"), body)
			}
			ni, err := narinfo.Parse(bytes.NewReader(body))
			if err != nil {
				t.Fatalf("%v\n%s", err, body)
			}
			if err := ni.Check(); err != nil {
				t.Error(err)
			}
			narHash := "sha256:" + nixbase32.EncodeToString(f.info.NarSha256)
			wantURL := "nar/" + hash + "-" + nixbase32.EncodeToString(f.info.NarSha256) + ".nar"
			if ni.StorePath != testPath || ni.URL != wantURL || ni.Compression != "none" ||
				ni.NarHash.String() != narHash || ni.FileHash.String() != narHash ||
				ni.NarSize != uint64(len(f.nar)) || ni.FileSize != ni.NarSize ||
				strings.Join(ni.References, " ") != "d5w9lzs3xm10036lkyps85s6bpk0xkyl-tree s1y78axx3ky46cgzv60pyry4irrlv0pl-busybox" ||
				ni.Deriver != "x72kdl72irdhls3jglkpi80ylayrccvj-tree.drv" || ni.CA != "" {
				t.Errorf("narinfo:\n%s", body)
			}
			fp := fmt.Sprintf("1;%s;%s;%d;%s,%s", testPath, narHash, len(f.nar), testPath, refA)
			if ni.Fingerprint() != fp {
				t.Errorf("fingerprint %q, want %q", ni.Fingerprint(), fp)
			}
			// The stored signature by the other key survives, the
			// malformed one does not; the farm adds its own.
			if !signature.VerifyFirst(fp, ni.Signatures, []signature.PublicKey{f.other.ToPublicKey()}) {
				t.Errorf("the stored signature is lost or broken:\n%s", body)
			}
			if got := signature.VerifyFirst(fp, ni.Signatures, []signature.PublicKey{pub}); got != signed {
				t.Errorf("verified by the farm's key: %v, want %v\n%s", got, signed, body)
			}
			if n := strings.Count(string(body), "Sig: "); n != map[bool]int{true: 2, false: 1}[signed] {
				t.Errorf("%d signatures:\n%s", n, body)
			}
			// HEAD: the same headers, no body.
			resp, body = get(t, "HEAD", srv.URL+"/"+hash+".narinfo")
			if resp.StatusCode != 200 || len(body) != 0 || resp.ContentLength <= 0 {
				t.Errorf("HEAD: %s, %d bytes, Content-Length %d", resp.Status, len(body), resp.ContentLength)
			}
		})
	}
}

// TestNarInfoKeyReplacesOwnSignature: a stored signature by the farm's
// own key (an older one, say) is replaced, not duplicated.
func TestNarInfoKeyReplacesOwnSignature(t *testing.T) {
	f := newFixture(t, 0)
	info := proto.Clone(f.info).(*storepb.PathInfo)
	info.Signatures = append(info.Signatures, f.key.ToPublicKey().Name+":"+strings.Repeat("A", 86)+"==")
	info.Ca = "fixed:r:sha256:" + nixbase32.EncodeToString(make([]byte, 32))
	ni, err := binarycache.NarInfo(info, &f.key)
	if err != nil {
		t.Fatal(err)
	}
	if len(ni.Signatures) != 2 || !signature.VerifyFirst(ni.Fingerprint(), ni.Signatures, []signature.PublicKey{f.key.ToPublicKey()}) {
		t.Errorf("signatures %v", ni.Signatures)
	}
	if !strings.Contains(ni.String(), "\nCA: fixed:r:sha256:") {
		t.Errorf("no CA:\n%s", ni)
	}
	// No references: an empty References line, and a fingerprint
	// ending in ';'.
	info.References = nil
	ni, err = binarycache.NarInfo(info, &f.key)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(ni.String(), "\nReferences: \n") || !strings.HasSuffix(ni.Fingerprint(), ";") {
		t.Errorf("no references:\n%s\n%s", ni, ni.Fingerprint())
	}
}

func TestNar(t *testing.T) {
	f := newFixture(t, 3<<20+5)
	srv := f.server(t, &f.key)
	url := srv.URL + "/" + binarycache.NarURL(f.info)
	resp, body := get(t, "GET", url)
	if resp.StatusCode != 200 || resp.ContentLength != int64(len(f.nar)) || resp.Header.Get("Content-Type") != "application/x-nix-nar" {
		t.Fatalf("%s, Content-Length %d (want %d), %s", resp.Status, resp.ContentLength, len(f.nar), resp.Header.Get("Content-Type"))
	}
	if !bytes.Equal(body, f.nar) {
		t.Fatalf("the NAR served (%d bytes) is not nix-store --dump's (%d bytes)", len(body), len(f.nar))
	}
	resp, body = get(t, "HEAD", url)
	if resp.StatusCode != 200 || len(body) != 0 || resp.ContentLength != int64(len(f.nar)) {
		t.Errorf("HEAD: %s, %d bytes, Content-Length %d", resp.Status, len(body), resp.ContentLength)
	}
}

// errStore is a Store whose every call fails with err.
type errStore struct {
	pathinfo.Store
	err error
}

func (s errStore) GetByHash(context.Context, string) (*storepb.PathInfo, error) { return nil, s.err }
func (s errStore) GetBuild(context.Context, string) (*storepb.Build, error)     { return nil, s.err }

func TestStatusCodes(t *testing.T) {
	f := newFixture(t, 0)
	srv := f.server(t, nil)
	hash := pathinfo.HashPart(testPath)
	narURL := "/" + binarycache.NarURL(f.info)
	otherNar := "/nar/" + hash + "-" + nixbase32.EncodeToString(make([]byte, 32)) + ".nar"

	// A path whose tree is not in the CAS (evicted, say).
	lost := &storepb.PathInfo{
		StorePath: "/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-lost",
		Node:      &storepb.Node{Kind: storepb.Node_DIRECTORY, DigestFunction: "blake3", Digest: pathinfo.DigestProto(digest.Compute(digest.BLAKE3, []byte("gone")))},
		NarSha256: make([]byte, 32), NarSize: 100,
	}
	if err := f.paths.Put(context.Background(), []*storepb.PathInfo{lost}); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		method, path string
		code         int
		body         string
	}{
		{"GET", "/nix-cache-info", 200, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"},
		{"HEAD", "/nix-cache-info", 200, ""},
		{"GET", "/" + unknownHash + ".narinfo", 404, ""},
		{"HEAD", "/" + unknownHash + ".narinfo", 404, ""},
		{"GET", "/" + hash[:31] + ".narinfo", 400, ""},
		{"GET", "/" + strings.ToUpper(hash) + ".narinfo", 400, ""},
		{"GET", "/" + hash[:31] + "e.narinfo", 400, ""}, // 'e' is not in nixbase32
		{"GET", "/x/" + hash + ".narinfo", 404, ""},
		{"POST", "/" + hash + ".narinfo", 405, ""},
		{"PUT", "/nar/x.nar", 405, ""},
		{"GET", narURL, 200, string(f.nar)},
		{"GET", otherNar, 404, ""},
		{"GET", "/nar/" + unknownHash + "-" + nixbase32.EncodeToString(make([]byte, 32)) + ".nar", 404, ""},
		{"GET", "/nar/" + hash + ".nar", 400, ""},
		{"GET", strings.TrimSuffix(narURL, ".nar") + ".nar.xz", 400, ""},
		{"GET", "/nar/" + pathinfo.HashPart(lost.StorePath) + "-" + nixbase32.EncodeToString(make([]byte, 32)) + ".nar", 404, ""},
		{"GET", "/log/" + filepath.Base(testDrv), 200, f.log},
		{"HEAD", "/log/" + filepath.Base(testDrv), 200, ""},
		{"GET", "/log/" + filepath.Base(testPath), 200, f.log}, // an output: its deriver's log
		{"GET", "/log/" + unknownHash + "-x.drv", 404, ""},
		{"GET", "/log/" + unknownHash + "-x", 404, ""},
		{"GET", "/log/" + filepath.Base(refA), 404, ""}, // not on the farm
		{"GET", "/log/nonsense", 400, ""},
		{"GET", "/log/" + hash + "-x/y.drv", 400, ""},
		{"GET", "/", 404, ""},
		{"GET", "/nix-cache-info/x", 404, ""},
	} {
		resp, body := get(t, tc.method, srv.URL+tc.path)
		if resp.StatusCode != tc.code || (tc.code == 200 && string(body) != tc.body) {
			t.Errorf("%s %s: %s %q, want %d %q", tc.method, tc.path, resp.Status, trim(body), tc.code, trim([]byte(tc.body)))
		}
		if tc.code == 200 && tc.method == "HEAD" && resp.ContentLength <= 0 {
			t.Errorf("%s %s: Content-Length %d", tc.method, tc.path, resp.ContentLength)
		}
		if tc.code != 200 && resp.Header.Get("Cache-Control") != "" {
			t.Errorf("%s %s: %d with Cache-Control %q", tc.method, tc.path, tc.code, resp.Header.Get("Cache-Control"))
		}
	}

	// Failures of the store are 5xx, which Nix takes as a cache that is
	// down rather than as a missing path.
	for code, want := range map[codes.Code]int{codes.Unavailable: 503, codes.Internal: 500, codes.DeadlineExceeded: 504, codes.InvalidArgument: 400} {
		h := binarycache.New(errStore{err: status.Error(code, "boom")}, f.cas, binarycache.Options{})
		for _, p := range []string{"/" + hash + ".narinfo", narURL, "/log/" + filepath.Base(testDrv)} {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest("GET", p, nil))
			if rec.Code != want {
				t.Errorf("store error %v: GET %s: %d, want %d", code, p, rec.Code, want)
			}
		}
	}
}

func trim(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "…"
	}
	return string(b)
}

// failingCAS fails reads of large blobs after some bytes.
type failingCAS struct{ blobstore.BlobAccess }

func (c failingCAS) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	r, err := c.BlobAccess.Get(ctx, d)
	if err != nil || d.Size() < 1<<20 {
		return r, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.MultiReader(io.LimitReader(r, 300<<10), errReader{}), r}, nil
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, status.Error(codes.DataLoss, "disk on fire") }

// TestNarFailsMidStream: when the CAS fails after the NAR has begun, the
// client gets a body shorter than Content-Length (an error), never a
// complete-looking truncated NAR.
func TestNarFailsMidStream(t *testing.T) {
	f := newFixture(t, 2<<20)
	srv := httptest.NewServer(binarycache.New(f.paths, failingCAS{f.cas}, binarycache.Options{}))
	t.Cleanup(srv.Close)
	resp, err := http.Get(srv.URL + "/" + binarycache.NarURL(f.info))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %s", resp.Status)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("read %d of %d bytes, error %v; want unexpected EOF", n, len(f.nar), err)
	}
}
