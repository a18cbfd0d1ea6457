package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestExecutionDefaults(t *testing.T) {
	cfg, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Execution.Backend != BackendBuiltin || cfg.Execution.IsRemote() {
		t.Errorf("default backend = %q", cfg.Execution.Backend)
	}
	cfg, err = Parse([]byte("execution:\n  backend: remote\n  remote:\n    address: 127.0.0.1:9000\n"))
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.Execution.Remote
	if r.DigestFunction != "blake3" || r.Concurrency != DefaultRemoteConcurrency ||
		r.ActionTimeout != Duration(DefaultRemoteActionTimeout) || r.RPCTimeout != Duration(time.Minute) {
		t.Errorf("remote defaults = %+v", r)
	}
	if got := strings.Join(r.Passed(), ","); got != "nix-system,nix-features" {
		t.Errorf("pass_properties = %s", got)
	}
}

func TestExecutionRemote(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	os.WriteFile(tok, []byte("Bearer secret\n"), 0o600)
	cfg, err := Parse([]byte(`execution:
  backend: remote
  remote:
    address: 127.0.0.1:9000
    instance_name: main
    headers: {x-team: nix}
    header_files: {authorization: ` + tok + `}
    platform: {OSFamily: linux}
    pass_properties: [nix-system]
    digest_function: sha256
    concurrency: 8
    action_timeout: 1h
    allow_unisolated: true
`))
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.Execution.Remote
	if r.InstanceName != "main" || r.DigestFunction != "sha256" || r.Concurrency != 8 || r.Platform["OSFamily"] != "linux" || !r.AllowUnisolated {
		t.Errorf("remote = %+v", r)
	}
	h, err := r.LoadHeaders()
	if err != nil {
		t.Fatal(err)
	}
	if h["authorization"] != "Bearer secret" || h["x-team"] != "nix" {
		t.Errorf("headers = %v", h)
	}
}

func TestExecutionErrorsNameTheKey(t *testing.T) {
	for doc, want := range map[string]string{
		"execution: {backend: nomad}":                                                                              "execution.backend",
		"execution: {backend: remote}":                                                                             "execution.remote: required",
		"execution: {backend: remote, remote: {}}":                                                                 "execution.remote.address",
		"execution: {remote: {address: 'a:1'}}":                                                                    "execution.remote: set, but",
		"execution: {backend: remote, remote: {address: 'a:1', digest_function: md5}}":                             "execution.remote.digest_function",
		"execution: {backend: remote, remote: {address: 'a:1', adress: x}}":                                        "execution.remote.adress",
		"execution: {backend: remote, remote: {address: 'a:1', concurrency: -1}}":                                  "execution.remote.concurrency",
		"execution: {backend: remote, remote: {address: 'a:1', tls: {cert_file: x}}}":                              "execution.remote.tls",
		"execution: {backend: remote, remote: {address: 'a:1', header_files: {authorization: /nonexistent}}}":      "execution.remote.header_files.authorization",
		"execution: {backend: remote, remote: {address: 'a:1', isolated_network: true, allow_fixed_output: true}}": "allow_fixed_output",
	} {
		_, err := Parse([]byte(doc))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to name %q", doc, err, want)
		}
	}
}
