package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/internal/nixtest"
	"tvixfarm/frontend/nar"
	"tvixfarm/frontend/nixstore"
	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// farmErrors are the errors the farm gives where they differ from Nix's.
var farmErrors = map[string]string{
	// Nix: "a 'x86_64-linux' with features {...} is required to build".
	"requiredSystemFeatures": "tvixfarm-no-such-feature",
	// Nix accepts file names that are not UTF-8; REAPI cannot carry them.
	"nonUtf8Name": "UTF-8",
}

// testFarm is an embedded farm and a coordinator for it.
type testFarm struct {
	farm coordinator.Farm
	cfg  coordinator.Config
	e    *farm.Embedded
	conn *grpc.ClientConn
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

// startFarm starts an all-in-one farm with real sandboxes in a temporary
// directory.
func startFarm(t *testing.T) *testFarm {
	t.Helper()
	cfg := config.Default()
	cfg.Data = t.TempDir()
	cfg.LogLevel = "warn"
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	e, err := farm.StartEmbedded(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Error(err)
		}
	})
	conn, err := grpc.NewClient(e.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// As `tvixfarm build` does: the farm's stores in-process, Execution
	// over gRPC (the gateway tests use a farm over gRPC only).
	f := coordinator.Farm{Execution: repb.NewExecutionClient(conn)}
	f.CAS, f.Store = e.LocalStores()
	ctx := context.Background()
	settings, err := nixstore.ReadSettings(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sandbox, err := coordinator.SandboxFiles(ctx, f.CAS, digest.BLAKE3, settings.SandboxPaths)
	if err != nil {
		t.Fatal(err)
	}
	local, err := nixstore.Local()
	if err != nil {
		t.Fatal(err)
	}
	return &testFarm{e: e, conn: conn, farm: f, cfg: coordinator.Config{Local: local, KeepGoing: true, Logger: log}.WithTranslate(digest.BLAKE3, settings.Cores, sandbox)}
}

func salt(t *testing.T) string {
	var b [6]byte
	rand.Read(b[:])
	return "t" + hex.EncodeToString(b[:])
}

// TestNixComparison builds every case of the corpus with nix-build and
// with the farm, and compares output paths, NAR hashes, sizes and
// references; expected failures must fail in both.
func TestNixComparison(t *testing.T) {
	requireSandbox(t)
	bb := nixtest.Busybox(t)
	tf := startFarm(t)
	runCorpus(t, tf, bb, nixtest.Cases, nil)
}

// runCorpus builds the cases with nix-build and with tf and compares
// them; the cases in skip are skipped, with the reason given.
func runCorpus(t *testing.T, tf *testFarm, bb string, cases []nixtest.Case, skip map[string]string) {
	s := salt(t)
	for _, c := range cases {
		t.Run(c.Attr, func(t *testing.T) {
			if c.Slow && testing.Short() {
				t.Skip("slow case")
			}
			if c.Bench {
				t.Skip("benchmark case")
			}
			if why, ok := skip[c.Attr]; ok {
				t.Skip(why)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			drvs, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{c.Attr}, map[string]string{"busybox": bb, "salt": s})
			if err != nil {
				t.Fatal(err)
			}
			var reqs []coordinator.Request
			for _, d := range drvs {
				reqs = append(reqs, coordinator.Request{Drv: d})
			}
			t0 := time.Now()
			res, ferr := coordinator.New(tf.farm, tf.cfg).Build(ctx, reqs)
			farmTook := time.Since(t0)
			t0 = time.Now()
			for _, d := range drvs {
				want, _, nerr := nixtest.Realise(ctx, d)
				wantErr := c.WantError
				if fe, ok := farmErrors[c.Attr]; ok {
					wantErr = fe
				}
				switch {
				case c.WantError != "" && nerr == nil:
					t.Fatalf("nix built %s, but the corpus says it fails with %q", d, c.WantError)
				case c.WantError == "" && nerr != nil:
					t.Fatalf("nix: %v", nerr)
				}
				if wantErr != "" {
					if ferr == nil {
						t.Fatalf("the farm built %s, want an error with %q", d, wantErr)
					}
					if !strings.Contains(ferr.Error(), wantErr) {
						t.Fatalf("farm error %q does not contain %q", ferr, wantErr)
					}
					if !strings.Contains(ferr.Error(), d) && !strings.Contains(ferr.Error(), "/nix/store/") {
						t.Errorf("farm error %q names no derivation or path", ferr)
					}
					continue
				}
				if ferr != nil {
					t.Fatalf("farm: %v", ferr)
				}
				compare(ctx, t, tf, d, want, res)
			}
			t.Logf("%d derivations: farm %s, nix %s", len(drvs), farmTook.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
		})
	}
}

// compare checks the farm's path infos of drv's outputs against Nix's.
func compare(ctx context.Context, t *testing.T, tf *testFarm, drv string, want map[string]nixtest.PathInfo, res *coordinator.Result) {
	t.Helper()
	got := res.Outputs[drv]
	if len(got) != len(want) {
		t.Fatalf("%s: farm outputs %v, nix %v", drv, got, want)
	}
	var paths []string
	for name, w := range want {
		if got[name] != w.Path {
			t.Errorf("%s: output %s: farm path %s, nix %s", drv, name, got[name], w.Path)
		}
		paths = append(paths, w.Path)
	}
	infos, err := tf.farm.Store.Get(ctx, paths)
	if err != nil {
		t.Fatal(err)
	}
	for name, w := range want {
		info := infos[w.Path]
		if info == nil {
			t.Errorf("%s: output %s (%s) is not in the farm's path-info store", drv, name, w.Path)
			continue
		}
		if h := "sha256:" + nixtest.Nix32(info.NarSha256); h != w.NarHash || info.NarSize != w.NarSize {
			t.Errorf("%s: output %s: farm NAR %s (%d bytes), nix %s (%d bytes)", drv, name, h, info.NarSize, w.NarHash, w.NarSize)
			dump(ctx, t, tf, info)
		}
		if !slices.Equal(info.References, w.References) {
			t.Errorf("%s: output %s: farm references %v, nix %v", drv, name, info.References, w.References)
		}
		if info.Deriver != drv {
			t.Errorf("%s: output %s: deriver %s", drv, name, info.Deriver)
		}
		if w.CA != "" && info.Ca != w.CA {
			t.Errorf("%s: output %s: farm ca %q, nix %q", drv, name, info.Ca, w.CA)
		}
	}
}

var _ = errors.New

// dump restores the farm's version of a path into $TVIXFARM_E2E_DUMP, if
// set, for comparing it with Nix's by hand.
func dump(ctx context.Context, t *testing.T, tf *testFarm, info *storepb.PathInfo) {
	dir := os.Getenv("TVIXFARM_E2E_DUMP")
	if dir == "" {
		return
	}
	n, err := coordinator.NarNode(info.Node)
	if err != nil {
		t.Log(err)
		return
	}
	dst := filepath.Join(dir, filepath.Base(info.StorePath))
	os.RemoveAll(dst)
	cmd := exec.CommandContext(ctx, "nix-store", "--restore", dst)
	pr, pw := io.Pipe()
	cmd.Stdin = pr
	go func() { pw.CloseWithError(nar.Write(ctx, tf.farm.CAS, digest.BLAKE3, n, pw)) }()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Logf("restoring %s: %v: %s", dst, err, out)
		return
	}
	t.Logf("the farm's %s is in %s", info.StorePath, dst)
}
