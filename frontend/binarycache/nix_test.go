package binarycache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/binarycache"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/internal/nixtest"
	"tvixfarm/frontend/nixstore"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

// nixFarm is an all-in-one farm (farm.New, as `tvixfarm serve` runs it)
// with its binary cache on a free loopback port, and a coordinator for it.
type nixFarm struct {
	f     *farm.Farm
	url   string // of the binary cache
	coord coordinator.Farm
	cfg   coordinator.Config
}

func startNixFarm(t *testing.T, keyFile string) *nixFarm {
	t.Helper()
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	httpListen := "127.0.0.1:0"
	cfg.BinaryCache.Listen = &httpListen
	cfg.BinaryCache.SecretKeyFile = keyFile
	cfg.Data = t.TempDir()
	cfg.LogLevel = "warn"
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, cancel := context.WithCancel(context.Background())
	f, err := farm.New(ctx, cfg, log)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil && !errors.Is(err, context.Canceled) {
			t.Error(err)
		}
	})
	if f.HTTPAddr() == "" {
		t.Fatal("the farm serves no binary cache")
	}
	conn, err := grpc.NewClient(f.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	cf := coordinator.Farm{
		CAS:       blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{}),
		Execution: repb.NewExecutionClient(conn),
		Store:     pathinfo.NewClient(conn),
	}
	settings, err := nixstore.ReadSettings(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sandbox, err := coordinator.SandboxFiles(ctx, cf.CAS, digest.BLAKE3, settings.SandboxPaths)
	if err != nil {
		t.Fatal(err)
	}
	local, err := nixstore.Local()
	if err != nil {
		t.Fatal(err)
	}
	return &nixFarm{
		f: f, url: "http://" + f.HTTPAddr(), coord: cf,
		cfg: coordinator.Config{Local: local, KeepGoing: true, Logger: log}.WithTranslate(digest.BLAKE3, settings.Cores, sandbox),
	}
}

// nix runs a Nix command with its own cache directory (Nix caches
// narinfos, positive and negative, per cache URL in
// ~/.cache/nix/binary-cache-v6.sqlite; a port can be reused by a later
// run) and returns its combined output.
func nix(ctx context.Context, t *testing.T, cacheHome string, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+cacheHome)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

// copiedInfo is `nix path-info --json` of one path.
type copiedInfo struct {
	Path       string   `json:"path"`
	NarHash    string   `json:"narHash"`
	NarSize    uint64   `json:"narSize"`
	References []string `json:"references"`
	Deriver    string   `json:"deriver"`
	Signatures []string `json:"signatures"`
	CA         string   `json:"ca"`
	Valid      *bool    `json:"valid"`
}

// pathInfos returns `nix path-info --json --recursive` of paths in store.
func pathInfos(ctx context.Context, t *testing.T, cacheHome, store string, paths []string) map[string]copiedInfo {
	t.Helper()
	out, err := nix(ctx, t, cacheHome, "nix", append([]string{"--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive", "--store", store}, paths...)...)
	if err != nil {
		t.Fatalf("nix path-info: %v\n%s", err, out)
	}
	var infos []copiedInfo
	// path-info prints warnings on stderr; the JSON is the last line.
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &infos); err != nil {
		t.Fatalf("nix path-info --json: %v\n%s", err, out)
	}
	m := map[string]copiedInfo{}
	for _, i := range infos {
		if i.Valid == nil || *i.Valid {
			m[i.Path] = i
		}
	}
	return m
}

// TestNixSubstitutes builds corpus derivations on a farm, then has Nix
// 2.8 fetch their outputs from the farm's binary cache into fresh local
// stores (`nix copy --from`, and `nix-store -r` with the cache as
// substituter), checking signatures against the farm's key, and compares
// what Nix registered with the farm's path infos.
func TestNixSubstitutes(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("TVIXFARM_REQUIRE_SANDBOX") == "1" {
			t.Fatal("sandbox required: not root")
		}
		t.Skip("the sandbox needs root")
	}
	bb := nixtest.Busybox(t)
	dir := t.TempDir()
	sec, pub, err := signature.GenerateKeypair("tvixfarm-test-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "farm.sec")
	if err := os.WriteFile(keyFile, []byte(sec.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	_, wrongPub, _ := signature.GenerateKeypair("tvixfarm-test-1", nil) // same name, other key
	nf := startNixFarm(t, keyFile)
	cacheHome := filepath.Join(dir, "cache")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var salt [6]byte
	rand.Read(salt[:])
	drvs, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{"trivial", "multiOutput", "builderFails"},
		map[string]string{"busybox": bb, "salt": "t" + hex.EncodeToString(salt[:])})
	if err != nil {
		t.Fatal(err)
	}
	if len(drvs) != 3 {
		t.Fatalf("derivations %v", drvs)
	}
	var reqs []coordinator.Request
	for _, d := range drvs {
		reqs = append(reqs, coordinator.Request{Drv: d})
	}
	res, berr := coordinator.New(nf.coord, nf.cfg).Build(ctx, reqs)
	if berr == nil || !strings.Contains(berr.Error(), "exit code 3") {
		t.Fatalf("build: %v, want builderFails to fail", berr)
	}
	var paths []string
	for _, d := range drvs[:2] {
		if len(res.Outputs[d]) == 0 {
			t.Fatalf("%s: no outputs (%v)", d, berr)
		}
		for _, p := range res.Outputs[d] {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	if len(paths) != 5 {
		t.Fatalf("outputs %v", paths)
	}

	// The farm's path infos of the outputs and their closure (busybox).
	farmInfos, err := nf.coord.Store.Get(ctx, append(paths, bb))
	if err != nil || len(farmInfos) != 6 {
		t.Fatalf("farm path infos: %d, %v", len(farmInfos), err)
	}

	nixCmd := []string{"--extra-experimental-features", "nix-command"}
	signed := func(key signature.PublicKey) []string {
		return []string{"--option", "require-sigs", "true", "--option", "trusted-public-keys", key.String()}
	}

	// nix copy --from the cache, signatures checked with the farm's key.
	store1 := "local?root=" + filepath.Join(dir, "store1")
	t0 := time.Now()
	out, err := nix(ctx, t, cacheHome, "nix", slices.Concat(nixCmd, []string{"copy", "--from", nf.url, "--to", store1}, signed(pub), paths)...)
	if err != nil {
		t.Fatalf("nix copy --from %s: %v\n%s", nf.url, err, out)
	}
	t.Logf("nix copy of %d paths and their closure: %s", len(paths), time.Since(t0).Round(time.Millisecond))
	copied := pathInfos(ctx, t, cacheHome, store1, paths)
	if len(copied) != 6 {
		t.Errorf("copied %d paths, want the 5 outputs and busybox: %v", len(copied), copied)
	}
	for p, fi := range farmInfos {
		ci, ok := copied[p]
		if !ok {
			t.Errorf("%s was not copied", p)
			continue
		}
		h, err := nixtest.NixNarHash(ci.NarHash)
		if err != nil {
			t.Fatal(err)
		}
		refs := slices.Clone(ci.References)
		sort.Strings(refs)
		if want := "sha256:" + nixtest.Nix32(fi.NarSha256); h != want || ci.NarSize != fi.NarSize {
			t.Errorf("%s: Nix has NAR %s (%d bytes), the farm %s (%d bytes)", p, h, ci.NarSize, want, fi.NarSize)
		}
		if !slices.Equal(refs, fi.References) {
			t.Errorf("%s: Nix has references %v, the farm %v", p, refs, fi.References)
		}
		if ci.Deriver != fi.Deriver || ci.CA != fi.Ca {
			t.Errorf("%s: Nix has deriver %q ca %q, the farm %q %q", p, ci.Deriver, ci.CA, fi.Deriver, fi.Ca)
		}
		if !slices.ContainsFunc(ci.Signatures, func(s string) bool { return strings.HasPrefix(s, "tvixfarm-test-1:") }) {
			t.Errorf("%s: no farm signature in %v", p, ci.Signatures)
		}
	}
	// The files themselves: trivial's output.
	for _, p := range paths {
		if strings.HasSuffix(p, "-trivial") {
			data, err := os.ReadFile(filepath.Join(dir, "store1", p))
			if err != nil || string(data) != "hello from a trivial derivation\n" {
				t.Errorf("%s in the copy: %q, %v", p, data, err)
			}
		}
	}

	// A cache signed by another key than the one trusted is refused.
	store2 := "local?root=" + filepath.Join(dir, "store2")
	out, err = nix(ctx, t, cacheHome, "nix", slices.Concat(nixCmd, []string{"copy", "--from", nf.url, "--to", store2}, signed(wrongPub), paths[:1])...)
	if err == nil {
		t.Errorf("nix copy with a wrong trusted key succeeded:\n%s", out)
	} else if !strings.Contains(out, "signature") {
		t.Errorf("nix copy with a wrong trusted key: %v, output without 'signature':\n%s", err, out)
	} else {
		t.Logf("with a wrong trusted key: %s", strings.TrimSpace(out))
	}

	// An unsigned cache over the same store: accepted when signatures
	// are not required.
	unsigned := httptest.NewServer(binarycache.New(nf.f.Paths(), nf.f.Stores().Default.CAS, binarycache.Options{Priority: 40, WantMassQuery: true}))
	defer unsigned.Close()
	store4 := "local?root=" + filepath.Join(dir, "store4")
	out, err = nix(ctx, t, cacheHome, "nix", slices.Concat(nixCmd, []string{"copy", "--from", unsigned.URL, "--to", store4}, signed(pub), paths[:1])...)
	if err == nil || !strings.Contains(out, "signature") {
		t.Errorf("nix copy from an unsigned cache with require-sigs: %v\n%s", err, out)
	}
	out, err = nix(ctx, t, cacheHome, "nix", slices.Concat(nixCmd, []string{"copy", "--no-check-sigs", "--from", unsigned.URL, "--to", store4}, paths)...)
	if err != nil {
		t.Errorf("nix copy --no-check-sigs from an unsigned cache: %v\n%s", err, out)
	} else if got := pathInfos(ctx, t, cacheHome, store4, paths); len(got) != 6 {
		t.Errorf("copied %d paths from the unsigned cache, want 6", len(got))
	}

	// The cache as a substituter: nix-store -r fetches the outputs (and
	// busybox) into a third store.
	root3 := filepath.Join(dir, "store3")
	out, err = nix(ctx, t, cacheHome, "nix-store", slices.Concat([]string{"--store", "local?root=" + root3, "-r"}, paths,
		[]string{"--option", "substituters", nf.url, "--option", "substitute", "true"}, signed(pub))...)
	if err != nil {
		t.Fatalf("nix-store -r with substituters = %s: %v\n%s", nf.url, err, out)
	}
	if got := pathInfos(ctx, t, cacheHome, "local?root="+root3, paths); len(got) != 6 {
		t.Errorf("substituted %d paths, want 6", len(got))
	}

	// Build logs, of a success and of a failure, as the farm recorded
	// them.
	for _, d := range []string{drvs[0], drvs[2]} {
		b, err := nf.coord.Store.GetBuild(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		want := ""
		if b.Log != nil && b.Log.Size > 0 {
			ld, _ := pathinfo.Digest(b.LogDigestFunction, b.Log)
			r, err := nf.coord.CAS.Get(ctx, ld)
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(r)
			r.Close()
			want = string(data)
		}
		resp, err := http.Get(nf.url + "/log/" + filepath.Base(d))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(got) != want {
			t.Errorf("log of %s: %s %q, want %q", d, resp.Status, got, want)
		}
		if d == drvs[2] && !strings.Contains(want, "about to fail with exit code 3") {
			t.Errorf("log of the failed build: %q", want)
		}
	}
	// And through Nix: `nix log` asks the substituters when the local
	// store (which has the .drv, from nix-instantiate) has no log.
	out, err = nix(ctx, t, cacheHome, "nix", slices.Concat(nixCmd, []string{"log", drvs[2], "--option", "substituters", nf.url})...)
	if err != nil || !strings.Contains(out, "about to fail with exit code 3") {
		t.Errorf("nix log %s with substituters = %s: %v\n%s", drvs[2], nf.url, err, out)
	}
}
