package e2e

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/coordinator"
	"tvixfarm/frontend/internal/nixtest"
	"tvixfarm/frontend/nixstore"
	"tvixfarm/frontend/pathinfo"
	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

// gatewaySkips are the cases a stock chrooting worker cannot give as Nix
// does (README, "Gateway mode"). envProbe's environment probe is built on
// its own below.
var gatewaySkips = map[string]string{
	"passAsFile": "the builder records the mode of its passAsFile files: Nix writes them 0644, a stock worker's input files are read-only (0444)",
	"envProbe": "identity (argv[0] is the builder's full path, not its basename), tty (no pty: stdout and stderr are separate files) " +
		"and filesystem (modes and owners are the worker's: /etc and /build files read-only, no nixbld group) differ on a stock worker by design",
}

// startPlainREAPI starts a tvixfarm that behaves like a stock REAPI
// cluster whose workers chroot into the input root
// (executor.plain_reapi), and returns its address.
func startPlainREAPI(t *testing.T, log *slog.Logger) string {
	t.Helper()
	cfg := config.Default()
	cfg.Data = t.TempDir()
	cfg.LogLevel = "warn"
	cfg.Executor.PlainREAPI = true
	// requiredSystemFeatures fails at once rather than after 30 s.
	cfg.Scheduler.PlatformGrace = config.Duration(time.Second)
	e, err := farm.StartEmbedded(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Error(err)
		}
	})
	return e.Addr
}

// startGateway starts a farm in gateway mode in front of remote, with
// remote's settings changed by edit, and a coordinator for it.
func startGateway(t *testing.T, log *slog.Logger, remote string, fn digest.Function, edit func(*config.Remote)) *testFarm {
	t.Helper()
	cfg := config.Default()
	cfg.Data = t.TempDir()
	cfg.LogLevel = "warn"
	r := &config.Remote{Address: remote, DigestFunction: fn.String(),
		// The plain instance's workers have no network, but the corpus's
		// fixed-output derivations do not fetch anything.
		AllowUnisolated: true, AllowFixedOutput: true}
	if edit != nil {
		edit(r)
	}
	cfg.Execution = config.Execution{Backend: config.BackendRemote, Remote: r}
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
	f := coordinator.Farm{
		CAS:       blobstore.NewGRPC(conn, "", blobstore.GRPCOptions{}),
		Execution: repb.NewExecutionClient(conn),
		Store:     pathinfo.NewClient(conn),
	}
	ctx := context.Background()
	settings, err := nixstore.ReadSettings(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sandbox, err := coordinator.SandboxFiles(ctx, f.CAS, fn, settings.SandboxPaths)
	if err != nil {
		t.Fatal(err)
	}
	local, err := nixstore.Local()
	if err != nil {
		t.Fatal(err)
	}
	return &testFarm{farm: f, cfg: coordinator.Config{Local: local, KeepGoing: true, Logger: log}.WithTranslate(fn, settings.Cores, sandbox)}
}

// TestGatewayNixComparison builds the corpus through a gateway in remote
// mode onto a second tvixfarm that behaves as a stock chrooting REAPI
// worker, and compares it with nix-build, as TestNixComparison does for
// the farm itself.
func TestGatewayNixComparison(t *testing.T) {
	requireSandbox(t)
	bb := nixtest.Busybox(t)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	remote := startPlainREAPI(t, log)
	tf := startGateway(t, log, remote, digest.BLAKE3, nil)
	runCorpus(t, tf, bb, nixtest.Cases, gatewaySkips)
	runCorpus(t, tf, bb, []nixtest.Case{{Attr: "envProbe.environment"}}, nil)
}

// TestGatewaySHA256 builds through a gateway whose remote backend uses
// SHA-256 (as Buildbarn does), with SHA-256 actions.
func TestGatewaySHA256(t *testing.T) {
	requireSandbox(t)
	bb := nixtest.Busybox(t)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	remote := startPlainREAPI(t, log)
	tf := startGateway(t, log, remote, digest.SHA256, nil)
	runCorpus(t, tf, bb, []nixtest.Case{{Attr: "multiOutput"}, {Attr: "fileTypes"}}, nil)
}

// TestGatewayRefusesNetworkNeeds: by default a gateway refuses
// fixed-output derivations and derivations it cannot promise a build
// without network, naming the derivation.
func TestGatewayRefusesNetworkNeeds(t *testing.T) {
	requireSandbox(t)
	bb := nixtest.Busybox(t)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	remote := startPlainREAPI(t, log)
	for _, c := range []struct {
		attr, want string
		edit       func(*config.Remote)
	}{
		{"fixedOutput", "is a fixed-output derivation: it needs network access", func(r *config.Remote) { r.AllowFixedOutput = false }},
		{"trivial", "must build without network access", func(r *config.Remote) { r.AllowUnisolated = false }},
	} {
		t.Run(c.attr, func(t *testing.T) {
			tf := startGateway(t, log, remote, digest.BLAKE3, c.edit)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			drvs, err := nixtest.Instantiate(ctx, nixtest.CorpusFile(), []string{c.attr}, map[string]string{"busybox": bb, "salt": salt(t)})
			if err != nil {
				t.Fatal(err)
			}
			var reqs []coordinator.Request
			for _, d := range drvs {
				reqs = append(reqs, coordinator.Request{Drv: d})
			}
			_, err = coordinator.New(tf.farm, tf.cfg).Build(ctx, reqs)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "derivation /nix/store/") {
				t.Fatalf("error %v, want one with %q naming the derivation", err, c.want)
			}
		})
	}
}
