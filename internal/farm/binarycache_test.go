package farm_test

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"tvixfarm/cas/digest"
	"tvixfarm/frontend/binarycache"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/internal/farm"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestBinaryCacheListeners: the binary cache listens next to gRPC (the
// port plus one, 0 staying 0), is signed with the configured key, is
// disabled by an empty listen address, and is never opened by an
// embedded farm.
func TestBinaryCacheListeners(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.Role = "storage"
	sec, pub, err := signature.GenerateKeypair("farm-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.BinaryCache.SecretKeyFile = filepath.Join(t.TempDir(), "key")
	os.WriteFile(cfg.BinaryCache.SecretKeyFile, []byte(sec.String()+"\n"), 0o600)
	r := start(t, cfg)
	addr := r.f.HTTPAddr()
	if !strings.HasPrefix(addr, "127.0.0.1:") || strings.HasSuffix(addr, ":0") || addr == r.f.Addr() {
		t.Fatalf("HTTPAddr() = %q (gRPC %s)", addr, r.f.Addr())
	}
	if code, body := httpGet(t, "http://"+addr+"/nix-cache-info"); code != 200 || body != "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n" {
		t.Errorf("/nix-cache-info: %d %q", code, body)
	}
	// A path registered through the store service is served, signed.
	info := putTree(t, r.f, 1000)
	code, body := httpGet(t, "http://"+addr+"/"+pathinfo.HashPart(info.StorePath)+".narinfo")
	if code != 200 || !strings.Contains(body, "Sig: farm-1:") {
		t.Fatalf("narinfo: %d %q", code, body)
	}
	ni, _ := binarycache.NarInfo(info, nil)
	var sig signature.Signature
	for _, l := range strings.Split(body, "\n") {
		if s, ok := strings.CutPrefix(l, "Sig: "); ok {
			sig, _ = signature.ParseSignature(s)
		}
	}
	if !pub.Verify(ni.Fingerprint(), sig) {
		t.Errorf("the signature does not verify with the farm's public key:\n%s", body)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Errorf("the binary cache still accepts connections after Serve returned")
	}

	cfg = testConfig(t.TempDir())
	cfg.Role = "storage"
	off := ""
	cfg.BinaryCache.Listen = &off
	if r := start(t, cfg); r.f.HTTPAddr() != "" {
		t.Errorf("disabled binary cache listens on %s", r.f.HTTPAddr())
	}

	cfg = testConfig(t.TempDir())
	cfg.Executor.Sandbox = "noop"
	e, err := farm.StartEmbedded(cfg, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	if a := e.Farm().HTTPAddr(); a != "" {
		t.Errorf("an embedded farm serves a binary cache on %s", a)
	}
	if err := e.Close(); err != nil {
		t.Error(err)
	}
	if err := e.Close(); err != nil { // again: returns at once
		t.Error(err)
	}

	// A key file that is not a secret key is refused by name.
	cfg = testConfig(t.TempDir())
	cfg.BinaryCache.SecretKeyFile = filepath.Join(t.TempDir(), "pub")
	os.WriteFile(cfg.BinaryCache.SecretKeyFile, []byte(pub.String()), 0o600)
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "binary_cache.secret_key_file") {
		t.Errorf("Validate with a public key as secret key: %v", err)
	}
}

// putTree uploads a directory with one file of size bytes and registers
// it in f's path-info store.
func putTree(t *testing.T, f *farm.Farm, size int) *storepb.PathInfo {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tree")
	os.MkdirAll(dir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, "data"), randBytes(7, size), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	ing, err := nar.Ingest(ctx, dir, digest.BLAKE3)
	if err != nil {
		t.Fatal(err)
	}
	cas := f.Stores().Default.CAS
	if err := nar.Upload(ctx, cas, ing); err != nil {
		t.Fatal(err)
	}
	info := &storepb.PathInfo{
		StorePath: "/nix/store/d5w9lzs3xm10036lkyps85s6bpk0xkyl-tree",
		Node:      &storepb.Node{Kind: storepb.Node_DIRECTORY, DigestFunction: "blake3", Digest: pathinfo.DigestProto(ing.Node.Digest)},
		NarSha256: ing.NarHash[:],
		NarSize:   ing.NarSize,
	}
	if err := f.Paths().Put(ctx, []*storepb.PathInfo{info}); err != nil {
		t.Fatal(err)
	}
	return info
}

// TestBinaryCacheGracefulShutdown: a NAR download in flight when the
// farm is told to stop completes before Serve returns.
func TestBinaryCacheGracefulShutdown(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.Role = "storage"
	r := start(t, cfg)
	info := putTree(t, r.f, 48<<20)
	resp, err := http.Get("http://" + r.f.HTTPAddr() + "/" + binarycache.NarURL(info))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got bytes.Buffer
	if _, err := io.CopyN(&got, resp.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	r.cancel()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-r.served:
		t.Fatalf("Serve returned (%v) with a download in flight", err)
	default:
	}
	if _, err := io.Copy(&got, resp.Body); err != nil || uint64(got.Len()) != info.NarSize {
		t.Fatalf("download across the shutdown: %d of %d bytes, %v", got.Len(), info.NarSize, err)
	}
	select {
	case err := <-r.served:
		r.served <- err
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Serve did not return after the download")
	}
}
