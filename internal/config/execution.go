package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

// Execution backends.
const (
	// BackendBuiltin is the farm's own scheduler (the default).
	BackendBuiltin = "builtin"
	// BackendRemote forwards every action to another REAPI cluster
	// (gateway mode): Buildbarn, BuildBuddy, NativeLink, another
	// tvixfarm.
	BackendRemote = "remote"
)

// Defaults of the remote execution backend.
const (
	DefaultRemoteConcurrency   = 64
	DefaultRemoteActionTimeout = 3 * time.Hour
	DefaultRemoteRPCTimeout    = time.Minute
)

// Execution says who runs the farm's actions: its own scheduler and
// executors (backend builtin, the default) or a remote REAPI endpoint
// (backend remote, gateway mode). In gateway mode this process keeps the
// Nix-facing parts (storage, path info, logs, the binary cache) and serves
// REAPI Execution to its clients, but runs each action on the remote
// cluster.
type Execution struct {
	// Backend is builtin (default) or remote.
	Backend string `yaml:"backend"`
	// Remote configures the remote backend; required with backend remote.
	Remote *Remote `yaml:"remote"`
}

// Remote is a remote REAPI cluster that runs the gateway's actions. Its
// CAS is its own: the gateway uploads each action's inputs there and copies
// the results back into its own CAS.
type Remote struct {
	// Address is the gRPC target of the remote's Execution and CAS
	// services (host:port, or any gRPC target such as dns:///host:port).
	Address string `yaml:"address"`
	// InstanceName is the REAPI instance name on the remote (default "").
	InstanceName string `yaml:"instance_name"`
	// TLS, when set, connects with TLS (system roots unless CAFile).
	TLS *TLS `yaml:"tls"`
	// Headers are gRPC metadata sent with every call ("x-api-key": ...).
	Headers map[string]string `yaml:"headers"`
	// HeaderFiles are gRPC metadata whose values are read from files at
	// start (surrounding white space trimmed), for credentials:
	// authorization: /etc/tvixfarm/bearer (a file "Bearer <token>").
	HeaderFiles map[string]string `yaml:"header_files"`
	// Platform are properties added to every action (e.g. OSFamily:
	// linux, container-image: ...). They replace any the action has of
	// the same name.
	Platform map[string]string `yaml:"platform"`
	// PassProperties are the platform properties of the gateway's actions
	// that are kept (default [nix-system, nix-features], which select
	// workers by Nix system and features); all others (tvixfarm's
	// network, nix-pty and limits) are dropped: the remote would not
	// honour them.
	PassProperties *[]string `yaml:"pass_properties"`
	// DigestFunction is the digest function of the actions the remote is
	// sent, sha256 or blake3 (default blake3, the gateway's own). The
	// gateway does not translate digests: the remote must support it
	// (checked at start) and clients must build with it (tvixfarm build
	// --digest-function sha256 for a SHA-256-only remote such as
	// Buildbarn); other actions are refused.
	DigestFunction string `yaml:"digest_function"`
	// Concurrency bounds the actions run on the remote at once (default
	// 64); more wait in the gateway, queued.
	Concurrency int `yaml:"concurrency"`
	// ActionTimeout is set on actions that have none (default 3h): some
	// servers require one.
	ActionTimeout Duration `yaml:"action_timeout"`
	// RPCTimeout bounds each unary RPC and each message of a stream to
	// the remote's CAS (default 1m).
	RPCTimeout Duration `yaml:"rpc_timeout"`
	// IsolatedNetwork says that the remote's workers run actions without
	// network access (for example bb_runner in a container with no
	// network). The gateway cannot check it. Without it, ordinary
	// derivations (which Nix builds without network) are refused unless
	// AllowUnisolated.
	IsolatedNetwork bool `yaml:"isolated_network"`
	// AllowUnisolated runs ordinary derivations on workers that may have
	// network access: the build loses Nix's network isolation.
	AllowUnisolated bool `yaml:"allow_unisolated"`
	// AllowFixedOutput runs fixed-output derivations (which need the
	// network to fetch) on the remote; refused by default, and always
	// with IsolatedNetwork.
	AllowFixedOutput bool `yaml:"allow_fixed_output"`
}

// TLS configures a TLS client connection.
type TLS struct {
	// CAFile is a PEM file of the CAs that sign the server's certificate
	// (default: the system's roots).
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are a PEM client certificate and its key, for
	// servers that require mutual TLS; both or neither.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ServerName overrides the name the certificate is checked against.
	ServerName string `yaml:"server_name"`
}

// DefaultPassProperties are the properties Remote.PassProperties keeps
// by default.
var DefaultPassProperties = []string{"nix-system", "nix-features"}

// Passed returns the properties kept from actions.
func (r *Remote) Passed() []string {
	if r.PassProperties == nil {
		return DefaultPassProperties
	}
	return *r.PassProperties
}

// IsRemote reports whether the remote backend is configured.
func (e *Execution) IsRemote() bool { return e.Backend == BackendRemote }

func (e *Execution) validate() error {
	switch e.Backend {
	case "":
		e.Backend = BackendBuiltin
	case BackendBuiltin, BackendRemote:
	default:
		return fmt.Errorf("execution.backend: %q is not one of builtin, remote", e.Backend)
	}
	if e.Backend == BackendBuiltin {
		if e.Remote != nil {
			return errors.New("execution.remote: set, but execution.backend is builtin (set backend: remote)")
		}
		return nil
	}
	r := e.Remote
	if r == nil {
		return errors.New("execution.remote: required with backend remote")
	}
	if r.Address == "" {
		return errors.New("execution.remote.address: must not be empty")
	}
	if strings.Contains(r.Address, "://") {
		// A gRPC target such as dns:///host:port: passed on as is.
	} else if _, _, err := net.SplitHostPort(r.Address); err != nil {
		return fmt.Errorf("execution.remote.address: %q is not host:port: %v", r.Address, err)
	}
	switch r.DigestFunction {
	case "":
		r.DigestFunction = "blake3"
	case "sha256", "blake3":
	default:
		return fmt.Errorf("execution.remote.digest_function: %q is not one of sha256, blake3", r.DigestFunction)
	}
	switch {
	case r.Concurrency < 0:
		return errors.New("execution.remote.concurrency: must not be negative")
	case r.Concurrency == 0:
		r.Concurrency = DefaultRemoteConcurrency
	}
	if r.ActionTimeout == 0 {
		r.ActionTimeout = Duration(DefaultRemoteActionTimeout)
	}
	if r.RPCTimeout == 0 {
		r.RPCTimeout = Duration(DefaultRemoteRPCTimeout)
	}
	if r.IsolatedNetwork && r.AllowFixedOutput {
		return errors.New("execution.remote.allow_fixed_output: fixed-output derivations need the network, and isolated_network says the workers have none")
	}
	if t := r.TLS; t != nil {
		if (t.CertFile == "") != (t.KeyFile == "") {
			return errors.New("execution.remote.tls: cert_file and key_file go together")
		}
		for k, f := range map[string]string{"ca_file": t.CAFile, "cert_file": t.CertFile, "key_file": t.KeyFile} {
			if f == "" {
				continue
			}
			if _, err := os.Stat(f); err != nil {
				return fmt.Errorf("execution.remote.tls.%s: %v", k, err)
			}
		}
	}
	for k := range r.Headers {
		if k == "" || strings.ToLower(k) != k {
			return fmt.Errorf("execution.remote.headers: %q: header names are lower case and not empty", k)
		}
	}
	for k, f := range r.HeaderFiles {
		if k == "" || strings.ToLower(k) != k {
			return fmt.Errorf("execution.remote.header_files: %q: header names are lower case and not empty", k)
		}
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("execution.remote.header_files.%s: %v", k, err)
		}
	}
	for k := range r.Platform {
		if k == "" {
			return errors.New("execution.remote.platform: empty property name")
		}
	}
	return nil
}

// LoadHeaders returns the remote's gRPC metadata: Headers and the
// contents of HeaderFiles. Errors name the file, never its contents.
func (r *Remote) LoadHeaders() (map[string]string, error) {
	h := map[string]string{}
	for k, v := range r.Headers {
		h[k] = v
	}
	for k, f := range r.HeaderFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("execution.remote.header_files.%s: %w", k, err)
		}
		h[k] = strings.TrimSpace(string(b))
	}
	return h, nil
}
