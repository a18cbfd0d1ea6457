package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultsNeedNoFile(t *testing.T) {
	cfg, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:8980" {
		t.Errorf("listen = %q", cfg.Listen)
	}
	if cfg.Storage.CAS.Disk == nil || cfg.Storage.CAS.Disk.Path != "cas" || cfg.Storage.CAS.Disk.MaxSize != 20<<30 {
		t.Errorf("default CAS = %+v", cfg.Storage.CAS.Disk)
	}
	if cfg.Storage.ActionCache.Disk == nil {
		t.Error("default action cache is not disk")
	}
	if os.Geteuid() == 0 && cfg.Data != "/var/lib/tvixfarm" {
		t.Errorf("root data dir = %q", cfg.Data)
	}
}

func TestExampleConfigParses(t *testing.T) {
	cfg, err := Load(filepath.Join("..", "..", "deploy", "config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Storage.CAS.Disk
	if d == nil || *d.PackBelow != 64<<10 || d.PackSize != 64<<20 || *d.VerifySampleRate != 0.01 {
		t.Errorf("example CAS = %+v", d)
	}
	if cfg.Storage.UploadIdleTimeout != Duration(time.Minute) {
		t.Errorf("upload_idle_timeout = %v", cfg.Storage.UploadIdleTimeout)
	}
	if b := cfg.BinaryCache; b.Listen != nil || b.Priority != 40 || !b.WantMassQuery {
		t.Errorf("example binary_cache = %+v", b)
	}
}

func TestComposedBackends(t *testing.T) {
	cfg, err := Parse([]byte(`
storage:
  action_cache:
    tiered:
      local: {memory: {max_size: 64MiB}}
      remote: {redis: {addr: "127.0.0.1:6379"}}
  instances:
    other:
      cas: {memory: {max_size: 1GB}}
      action_cache: {memory: {max_size: 1KiB}}
`))
	if err != nil {
		t.Fatal(err)
	}
	tr := cfg.Storage.ActionCache.Tiered
	if tr == nil || tr.Local.Memory.MaxSize != 64<<20 || tr.Remote.Redis.Addr != "127.0.0.1:6379" {
		t.Fatalf("tiered = %+v", tr)
	}
	if r := tr.Remote.Redis; r.MaxBlobSize != 1<<20 || r.Timeout != Duration(5*time.Second) {
		t.Errorf("redis defaults not applied: %+v", r)
	}
	if cfg.Storage.Instances["other"].CAS.Memory.MaxSize != 1e9 {
		t.Errorf("instance store = %+v", cfg.Storage.Instances["other"])
	}
	if cfg.Storage.CAS.Disk == nil {
		t.Error("default CAS lost when only the action cache is configured")
	}
}

func TestErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{"lisen: x\n", `unknown key "lisen"`},
		{"storage:\n  cas:\n    disk:\n      pth: x\n", `storage.cas.disk.pth`},
		{"storage:\n  cas:\n    disk:\n      path: x\n      max_size: lots\n", `storage.cas.disk.max_size`},
		{"storage:\n  cas:\n    disk: {path: x, max_size: 1GiB}\n    memory: {max_size: 1GiB}\n", `storage.cas: exactly one of`},
		{"storage:\n  cas:\n    disk: {path: x, max_size: 0}\n", `storage.cas.disk.max_size`},
		{"storage:\n  cas:\n    disk: {path: x, max_size: 1GiB, verify_sample_rate: 2}\n", `storage.cas.disk.verify_sample_rate`},
		{"storage:\n  action_cache:\n    tiered:\n      local: {memory: {max_size: 1MiB}}\n", `storage.action_cache.tiered.remote`},
		{"storage:\n  cas:\n    redis: {max_blob_size: 1MiB}\n", `storage.cas.redis.addr`},
		{"storage:\n  instances:\n    x:\n      cas: {memory: {max_size: 1MiB}}\n", `storage.instances.x`},
		{"storage:\n  upload_idle_timeout: soon\n", `storage.upload_idle_timeout`},
		{"log_level: loud\n", `log_level`},
		{"binary_cache:\n  lisen: x\n", `binary_cache.lisen`},
		{"binary_cache:\n  listen: nope\n", `binary_cache.listen`},
		{"binary_cache:\n  priority: -1\n", `binary_cache.priority`},
		{"binary_cache:\n  secret_key_file: /nonexistent/key\n", `binary_cache.secret_key_file`},
		{"listen: 127.0.0.1:65535\n", `binary_cache.listen`},
		{"listen: [\n", `line`},
	} {
		_, err := Parse([]byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want an error containing %q", tc.doc, err, tc.want)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]Size{"0": 0, "100": 100, "1KiB": 1024, "2 MiB": 2 << 20, "3GiB": 3 << 30, "1TiB": 1 << 40, "5GB": 5e9, "7B": 7} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "x", "-1", "1.5GiB", "1PiB", "99999999999TiB"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) succeeded", in)
		}
	}
}

func TestBinaryCache(t *testing.T) {
	cfg, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if a, err := cfg.HTTPListen(); a != "127.0.0.1:8981" || err != nil {
		t.Errorf("default HTTP listen = %q, %v", a, err)
	}
	if b := cfg.BinaryCache; b.Priority != 40 || !b.WantMassQuery || b.SecretKeyFile != "" {
		t.Errorf("defaults = %+v", b)
	}
	cfg, err = Parse([]byte("listen: 0.0.0.0:9000\nbinary_cache:\n  priority: 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if a, _ := cfg.HTTPListen(); a != "0.0.0.0:9001" || cfg.BinaryCache.Priority != 0 || !cfg.BinaryCache.WantMassQuery {
		t.Errorf("derived listen %q, %+v", a, cfg.BinaryCache)
	}
	cfg, err = Parse([]byte("binary_cache:\n  listen: \"\"\n  want_mass_query: false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if a, _ := cfg.HTTPListen(); a != "" || cfg.BinaryCache.WantMassQuery || cfg.BinaryCache.Priority != 40 {
		t.Errorf("disabled: listen %q, %+v", a, cfg.BinaryCache)
	}

	dir := t.TempDir()
	good := filepath.Join(dir, "good.sec")
	// From go-nix's tests; a trailing newline is allowed.
	os.WriteFile(good, []byte("test1:jbX9NxZp8WB/coK8k7yLf0gNYmBbIbCrOFwgJgI7OV+0sASf4R5oFQlioSlN3bJ56uvshzr7S9Z75pcv+9hSkQ==\n"), 0o600)
	cfg, err = Parse([]byte("binary_cache: {listen: 127.0.0.1:0, secret_key_file: " + good + "}\n"))
	if err != nil {
		t.Fatal(err)
	}
	k, err := LoadSecretKey(cfg.BinaryCache.SecretKeyFile)
	if err != nil || k.ToPublicKey().String() != "test1:tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE=" {
		t.Errorf("key: %v %v", k.ToPublicKey(), err)
	}
	bad := filepath.Join(dir, "public.key")
	os.WriteFile(bad, []byte("test1:tLAEn+EeaBUJYqEpTd2yeerr7Ic6+0vWe+aXL/vYUpE="), 0o600)
	_, err = Parse([]byte("binary_cache: {secret_key_file: " + bad + "}\n"))
	if err == nil || !strings.Contains(err.Error(), "binary_cache.secret_key_file") || !strings.Contains(err.Error(), bad) || strings.Contains(err.Error(), "tLAEn") {
		t.Errorf("a public key as secret key: %v", err)
	}
}

func TestListenPlus(t *testing.T) {
	for in, want := range map[string]string{"127.0.0.1:8980": "127.0.0.1:8982", "127.0.0.1:0": "127.0.0.1:0", ":8980": ":8982", "[::1]:10": "[::1]:12"} {
		if got, err := ListenPlus(in, 2); got != want || err != nil {
			t.Errorf("ListenPlus(%q, 2) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"x", "127.0.0.1:65534", "127.0.0.1:http"} {
		if got, err := ListenPlus(in, 2); err == nil {
			t.Errorf("ListenPlus(%q, 2) = %q", in, got)
		}
	}
}
