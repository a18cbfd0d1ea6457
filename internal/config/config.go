// Package config defines tvixfarm's configuration file: one YAML document
// that describes every role and backend. Every setting has a default, so no
// file is needed; unknown keys and invalid values are errors that name the
// key. The storage part is a tree that maps one-to-one onto the composition
// of blobstore backends that package farm builds from it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"gopkg.in/yaml.v3"
)

// Config is the whole configuration file.
type Config struct {
	// Listen is the gRPC address of the farm (flag --listen).
	Listen string `yaml:"listen"`
	// Data is the directory for persistent state (flag --data).
	Data string `yaml:"data"`
	// MetricsListen, when set, serves Prometheus metrics (/metrics) and Go
	// profiles (/debug/pprof/) over HTTP.
	MetricsListen string `yaml:"metrics_listen"`
	// LogLevel is one of debug, info, warn, error.
	LogLevel string `yaml:"log_level"`
	// Storage configures the CAS and the action cache.
	Storage Storage `yaml:"storage"`
	// Executor configures the executor role.
	Executor Executor `yaml:"executor"`
	// Scheduler configures the scheduler role.
	Scheduler Scheduler `yaml:"scheduler"`
	// BinaryCache configures the Nix binary cache served over HTTP.
	BinaryCache BinaryCache `yaml:"binary_cache"`
	// Execution selects the execution backend: the built-in scheduler
	// or a remote REAPI cluster (gateway mode; execution.go).
	Execution Execution `yaml:"execution"`
	// Role is the set of roles this process runs (flag --role); it is
	// not part of the file.
	Role string `yaml:"-"`
}

// Executor configures the executor role: the worker that runs actions in
// sandboxes. Zero values mean the defaults documented on each field.
type Executor struct {
	// Name identifies the worker in results (default: the host name).
	Name string `yaml:"name"`
	// Slots is the number of actions run at once (default: CPUs).
	Slots int `yaml:"slots"`
	// Systems are the Nix systems built for (default [x86_64-linux]).
	Systems []string `yaml:"systems"`
	// Features are the Nix system features offered (kvm, big-parallel...).
	Features []string `yaml:"features"`
	// Sandbox is runc (default: libcontainer, embedded) or unsandboxed
	// (development only: no isolation, refuses Nix actions).
	Sandbox string `yaml:"sandbox"`
	// Prewarm is how many sandboxes are prepared ahead of time (default:
	// slots; 0 disables).
	Prewarm *int `yaml:"prewarm"`
	// Reuse is how many Nix builds one sandbox runs, one after another,
	// each cloned into new namespaces by the sandbox's stub (default
	// 100; 1: a new container for every build).
	Reuse *int `yaml:"reuse"`
	// DefaultTimeout applies to actions without one (default 3h);
	// MaxTimeout caps what actions may ask (default 24h).
	DefaultTimeout Duration `yaml:"default_timeout"`
	MaxTimeout     Duration `yaml:"max_timeout"`
	// CacheSize bounds the local input file cache (default 10 GiB).
	CacheSize Size `yaml:"cache_size"`
	// Limits are the limits of actions that ask for none.
	Limits Limits `yaml:"limits"`
	// HostPaths are the host paths of the read-only root that non-Nix
	// actions see (default: /usr, /bin, /lib*, /etc essentials).
	HostPaths []string `yaml:"host_paths"`
	// Storage is the address of the farm's storage (REAPI CAS) for an
	// executor that runs without the storage role.
	Storage string `yaml:"storage"`
	// PlainREAPI makes the executor behave like a stock REAPI worker that
	// chroots into the input root (Buildbarn's bb_runner with
	// chroot_into_input_root): every action runs chrooted into its input
	// root as it is, and no tvixfarm platform property (nix-pty,
	// network, limits) is honoured. For testing gateway mode.
	PlainREAPI bool `yaml:"plain_reapi"`
	// Scheduler is the address of a scheduler node (any node of the
	// cluster) for an executor that runs without the scheduler role
	// (flag --scheduler), or a comma-separated list of them: the executor
	// then moves to another node when the one it uses dies. An all-in-one
	// process connects its executor to its own scheduler.
	Scheduler string `yaml:"scheduler"`
}

// Scheduler configures the scheduler role: a raft-replicated REAPI
// Execution service. The defaults make a single node that bootstraps
// itself.
type Scheduler struct {
	// NodeID names this node in the raft cluster (default "node1").
	NodeID string `yaml:"node_id"`
	// RaftListen is raft's address (default: the gRPC listen address
	// with the port plus two, 127.0.0.1:8982 by default, or an ephemeral
	// port if the listen port is 0; plus one is the binary cache's).
	RaftListen string `yaml:"raft_listen"`
	// Advertise is the gRPC address other nodes forward calls to
	// (default: the listen address).
	Advertise string `yaml:"advertise"`
	// Bootstrap forms a new cluster when the node has no raft state: of
	// Peers, or of itself alone (default true; every initial peer may
	// bootstrap with the same Peers). A node that joins a running
	// cluster (farmctl members add) sets bootstrap: false.
	Bootstrap *bool `yaml:"bootstrap"`
	// Peers are the initial members: id and raft address of each.
	Peers []Peer `yaml:"peers"`
	// Storage is the address of the farm's storage (REAPI CAS and action
	// cache) for a scheduler without the storage role.
	Storage string `yaml:"storage"`
	// HeartbeatInterval is how often workers send heartbeats (default
	// 1s); a worker silent for WorkerTimeout (default 5s) is lost and
	// its actions are requeued, at most MaxAttempts times (default 3).
	HeartbeatInterval Duration `yaml:"heartbeat_interval"`
	WorkerTimeout     Duration `yaml:"worker_timeout"`
	MaxAttempts       int      `yaml:"max_attempts"`
	// RetainCompleted is how long completed operations stay queryable
	// (default 1h).
	RetainCompleted Duration `yaml:"retain_completed"`
	// PlatformGrace is how long an action that no connected worker could
	// run waits for workers before it fails (default 30s).
	PlatformGrace Duration `yaml:"platform_grace"`
	// CancelOnDisconnect cancels an action when all its clients have
	// disconnected (default false: it runs on and is cached).
	CancelOnDisconnect bool `yaml:"cancel_on_disconnect"`
}

// BinaryCache configures the Nix binary cache that processes with the
// storage or the scheduler role serve over HTTP from the farm's path-info
// store and CAS: /nix-cache-info, /<hash>.narinfo, /nar/… and
// /log/<drv>.
type BinaryCache struct {
	// Listen is the HTTP address (flag --http-listen). Unset, it is the
	// gRPC listen address with the port plus one (127.0.0.1:8981 by
	// default; an ephemeral port if the listen port is 0); empty
	// disables the binary cache.
	Listen *string `yaml:"listen"`
	// SecretKeyFile is a Nix secret key file ("name:base64", as written
	// by nix-store --generate-binary-cache-key) that narinfos are signed
	// with; a relative path is relative to the working directory.
	// Without it narinfos carry only the signatures the store has.
	SecretKeyFile string `yaml:"secret_key_file"`
	// Priority is announced in /nix-cache-info (default 40, as
	// cache.nixos.org; Nix prefers lower values).
	Priority int `yaml:"priority"`
	// WantMassQuery is announced in /nix-cache-info (default true).
	WantMassQuery bool `yaml:"want_mass_query"`
}

// DefaultBinaryCachePriority is the binary cache's default priority.
const DefaultBinaryCachePriority = 40

// HTTPListen returns the binary cache's HTTP address: BinaryCache.Listen
// if set (empty: disabled), else the gRPC listen address with the port
// plus one (port 0 stays 0, an ephemeral port).
func (c *Config) HTTPListen() (string, error) {
	if c.BinaryCache.Listen != nil {
		return *c.BinaryCache.Listen, nil
	}
	return ListenPlus(c.Listen, 1)
}

// ListenPlus returns listen with its port plus n, or with port 0 if
// listen's port is 0. Defaults of the addresses next to the gRPC one are
// derived with it: the binary cache's (plus one) and raft's (plus two).
func ListenPlus(listen string, n int) (string, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("listen address %q: %w", listen, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return "", fmt.Errorf("listen address %q: invalid port", listen)
	}
	if p == 0 {
		return net.JoinHostPort(host, "0"), nil
	}
	if p+n > 65535 {
		return "", fmt.Errorf("listen address %q: no port %d above it", listen, n)
	}
	return net.JoinHostPort(host, strconv.Itoa(p+n)), nil
}

// Peer is a member of the scheduler's raft cluster.
type Peer struct {
	ID   string `yaml:"id"`
	Raft string `yaml:"raft"`
}

// Limits bound an action's resources; zero is no limit.
type Limits struct {
	Memory Size    `yaml:"memory"`
	Pids   int64   `yaml:"pids"`
	CPUs   float64 `yaml:"cpus"`
}

// Storage configures the content-addressable store and the action cache.
type Storage struct {
	CAS         Backend `yaml:"cas"`
	ActionCache Backend `yaml:"action_cache"`
	// Instances gives instance names their own stores; instance names not
	// listed share the stores above.
	Instances map[string]InstanceStorage `yaml:"instances"`
	// UploadIdleTimeout is how long an interrupted ByteStream upload is
	// kept for the client to resume it.
	UploadIdleTimeout Duration `yaml:"upload_idle_timeout"`
}

// InstanceStorage are the stores of one instance name.
type InstanceStorage struct {
	CAS         Backend `yaml:"cas"`
	ActionCache Backend `yaml:"action_cache"`
}

// Backend is one node of a storage stack: exactly one field is set.
type Backend struct {
	Disk   *Disk   `yaml:"disk"`
	Memory *Memory `yaml:"memory"`
	Redis  *Redis  `yaml:"redis"`
	Tiered *Tiered `yaml:"tiered"`
}

// Disk stores blobs as files under a directory.
type Disk struct {
	// Path is the directory, relative to the data directory unless absolute.
	Path string `yaml:"path"`
	// MaxSize bounds the bytes stored (e.g. "20GiB").
	MaxSize Size `yaml:"max_size"`
	// Fsync makes writes durable across power loss (default false: writes
	// survive a crash of the process, and reads verify blobs).
	Fsync bool `yaml:"fsync"`
	// VerifyBelow: blobs up to this size are hashed on every read.
	VerifyBelow *Size `yaml:"verify_below"`
	// VerifySampleRate is the fraction of reads of larger blobs hashed.
	VerifySampleRate *float64 `yaml:"verify_sample_rate"`
	// PackBelow: blobs smaller than this are appended to pack files rather
	// than stored as a file each (default 64KiB; 0B disables packing).
	PackBelow *Size `yaml:"pack_below"`
	// PackSize is the size of each pack file (default 64MiB).
	PackSize Size `yaml:"pack_size"`
	// DirectIO writes and reads blobs of 1 MiB and more with O_DIRECT
	// where the file system supports it (default true).
	DirectIO *bool `yaml:"direct_io"`
}

// Memory keeps blobs in memory.
type Memory struct {
	MaxSize Size `yaml:"max_size"`
}

// Redis stores blobs in a Redis server.
type Redis struct {
	Addr        string   `yaml:"addr"`
	Username    string   `yaml:"username"`
	Password    string   `yaml:"password"`
	DB          int      `yaml:"db"`
	KeyPrefix   string   `yaml:"key_prefix"`
	MaxBlobSize Size     `yaml:"max_blob_size"`
	Timeout     Duration `yaml:"timeout"`
	DialTimeout Duration `yaml:"dial_timeout"`
	TTL         Duration `yaml:"ttl"`
}

// Tiered puts a local cache in front of a remote store.
type Tiered struct {
	Local  Backend `yaml:"local"`
	Remote Backend `yaml:"remote"`
}

// Default returns the configuration used when no file is given.
func Default() *Config {
	return &Config{
		Listen:   "127.0.0.1:8980",
		Data:     DefaultDataDir(),
		LogLevel: "info",
		Storage: Storage{
			CAS:               Backend{Disk: &Disk{Path: "cas", MaxSize: 20 << 30}},
			ActionCache:       Backend{Disk: &Disk{Path: "ac", MaxSize: 1 << 30}},
			UploadIdleTimeout: Duration(time.Minute),
		},
		BinaryCache: BinaryCache{Priority: DefaultBinaryCachePriority, WantMassQuery: true},
	}
}

// DefaultDataDir is /var/lib/tvixfarm for root, else
// $XDG_DATA_HOME/tvixfarm (~/.local/share/tvixfarm).
func DefaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/tvixfarm"
	}
	if x := os.Getenv("XDG_DATA_HOME"); x != "" {
		return filepath.Join(x, "tvixfarm")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "tvixfarm")
	}
	return filepath.Join(home, ".local", "share", "tvixfarm")
}

// Load reads a configuration file over the defaults and validates it.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes a configuration document over the defaults and validates
// it. Keys the document sets replace the defaults; a backend given in the
// document replaces the default backend entirely.
func Parse(data []byte) (*Config, error) {
	cfg := Default()
	// binary_cache is decoded over its defaults: keys it sets replace
	// them, so "listen: ''" and "priority: 0" can be told from absent.
	doc := Config{BinaryCache: cfg.BinaryCache}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		var root yaml.Node
		yaml.Unmarshal(data, &root)
		return nil, cleanYAMLError(err, keyLines(&root, "", map[int]string{}))
	}
	if doc.Listen != "" {
		cfg.Listen = doc.Listen
	}
	if doc.Data != "" {
		cfg.Data = doc.Data
	}
	if doc.MetricsListen != "" {
		cfg.MetricsListen = doc.MetricsListen
	}
	if doc.LogLevel != "" {
		cfg.LogLevel = doc.LogLevel
	}
	if !doc.Storage.CAS.empty() {
		cfg.Storage.CAS = doc.Storage.CAS
	}
	if !doc.Storage.ActionCache.empty() {
		cfg.Storage.ActionCache = doc.Storage.ActionCache
	}
	if doc.Storage.UploadIdleTimeout != 0 {
		cfg.Storage.UploadIdleTimeout = doc.Storage.UploadIdleTimeout
	}
	cfg.Storage.Instances = doc.Storage.Instances
	cfg.Executor = doc.Executor
	cfg.Scheduler = doc.Scheduler
	cfg.BinaryCache = doc.BinaryCache
	cfg.Execution = doc.Execution
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// cleanYAMLError turns yaml.v3's "field x not found in type config.Disk"
// into a message that names the key.
func cleanYAMLError(err error, keys map[int]string) error {
	msgs := []string{err.Error()}
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	for i, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		line, rest, ok := strings.Cut(m, ": ")
		if !ok {
			continue
		}
		if key, _, ok := strings.Cut(strings.TrimPrefix(rest, "field "), " not found"); ok && strings.HasPrefix(rest, "field ") {
			rest = "unknown key " + strconv.Quote(key)
		}
		var n int
		if _, err := fmt.Sscanf(line, "line %d", &n); err == nil && keys[n] != "" {
			m = fmt.Sprintf("%s (%s): %s", keys[n], line, rest)
		} else {
			m = line + ": " + rest
		}
		msgs[i] = m
	}
	return errors.New(strings.Join(msgs, "; "))
}

// keyLines maps the line of every key in a YAML tree to its dotted path.
func keyLines(n *yaml.Node, prefix string, out map[int]string) map[int]string {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			keyLines(c, prefix, out)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i].Value
			if prefix != "" {
				k = prefix + "." + k
			}
			out[n.Content[i].Line] = k
			keyLines(n.Content[i+1], k, out)
		}
	}
	return out
}

func (b Backend) empty() bool {
	return b.Disk == nil && b.Memory == nil && b.Redis == nil && b.Tiered == nil
}

// Validate checks the configuration; errors name the offending key.
func (c *Config) Validate() error {
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log_level: %q is not one of debug, info, warn, error", c.LogLevel)
	}
	if c.Listen == "" {
		return errors.New("listen: must not be empty")
	}
	if err := c.Storage.CAS.validate("storage.cas"); err != nil {
		return err
	}
	if err := c.Storage.ActionCache.validate("storage.action_cache"); err != nil {
		return err
	}
	for name, in := range c.Storage.Instances {
		key := "storage.instances." + name
		if in.CAS.empty() || in.ActionCache.empty() {
			return fmt.Errorf("%s: both cas and action_cache must be set", key)
		}
		if err := in.CAS.validate(key + ".cas"); err != nil {
			return err
		}
		if err := in.ActionCache.validate(key + ".action_cache"); err != nil {
			return err
		}
	}
	if c.Storage.UploadIdleTimeout < 0 {
		return errors.New("storage.upload_idle_timeout: must not be negative")
	}
	if err := c.Scheduler.validate(); err != nil {
		return err
	}
	if err := c.Executor.validate(); err != nil {
		return err
	}
	if err := c.Execution.validate(); err != nil {
		return err
	}
	return c.BinaryCache.validate(c.Listen)
}

func (b *BinaryCache) validate(listen string) error {
	if b.Listen != nil {
		if *b.Listen != "" {
			if _, _, err := net.SplitHostPort(*b.Listen); err != nil {
				return fmt.Errorf("binary_cache.listen: %q is not host:port: %v", *b.Listen, err)
			}
		}
	} else if _, err := ListenPlus(listen, 1); err != nil {
		return fmt.Errorf("binary_cache.listen: the default (the listen port plus one): %v", err)
	}
	if b.Priority < 0 {
		return errors.New("binary_cache.priority: must not be negative")
	}
	if b.SecretKeyFile != "" {
		if _, err := LoadSecretKey(b.SecretKeyFile); err != nil {
			return fmt.Errorf("binary_cache.secret_key_file: %v", err)
		}
	}
	return nil
}

// LoadSecretKey reads a Nix secret key file: "name:base64" of an
// Ed25519 private key, surrounding white space ignored. Errors name the
// file, never its contents.
func LoadSecretKey(path string) (signature.SecretKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return signature.SecretKey{}, err
	}
	k, err := signature.LoadSecretKey(strings.TrimSpace(string(data)))
	if err != nil {
		return signature.SecretKey{}, fmt.Errorf("%s: not a Nix secret key (name:base64, as nix-store --generate-binary-cache-key writes): %v", path, err)
	}
	return k, nil
}

func (b *Backend) validate(key string) error {
	n := 0
	for _, set := range []bool{b.Disk != nil, b.Memory != nil, b.Redis != nil, b.Tiered != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("%s: exactly one of disk, memory, redis, tiered must be set (found %d)", key, n)
	}
	switch {
	case b.Disk != nil:
		d := b.Disk
		if d.Path == "" {
			return fmt.Errorf("%s.disk.path: must not be empty", key)
		}
		if d.MaxSize <= 0 {
			return fmt.Errorf("%s.disk.max_size: must be positive", key)
		}
		if d.VerifySampleRate != nil && (*d.VerifySampleRate < 0 || *d.VerifySampleRate > 1) {
			return fmt.Errorf("%s.disk.verify_sample_rate: %v is not between 0 and 1", key, *d.VerifySampleRate)
		}
	case b.Memory != nil:
		if b.Memory.MaxSize <= 0 {
			return fmt.Errorf("%s.memory.max_size: must be positive", key)
		}
	case b.Redis != nil:
		r := b.Redis
		if r.Addr == "" {
			return fmt.Errorf("%s.redis.addr: must not be empty", key)
		}
		if r.MaxBlobSize == 0 {
			r.MaxBlobSize = 1 << 20
		}
		if r.MaxBlobSize < 0 {
			return fmt.Errorf("%s.redis.max_blob_size: must be positive", key)
		}
		if r.Timeout == 0 {
			r.Timeout = Duration(5 * time.Second)
		}
		if r.DialTimeout == 0 {
			r.DialTimeout = Duration(5 * time.Second)
		}
	case b.Tiered != nil:
		if err := b.Tiered.Local.validate(key + ".tiered.local"); err != nil {
			return err
		}
		if err := b.Tiered.Remote.validate(key + ".tiered.remote"); err != nil {
			return err
		}
	}
	return nil
}

// Size is a byte count written as a number with an optional unit: B, KB,
// MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024).
type Size int64

var sizeUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1},
}

// ParseSize parses a Size.
func ParseSize(s string) (Size, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range sizeUnits {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q (want e.g. 512MiB, 20GiB, 1048576)", s)
	}
	return Size(n * mult), nil
}

// UnmarshalYAML implements yaml.Unmarshaler.
func (s *Size) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %v", n.Line, err)
	}
	*s = v
	return nil
}

// Duration is a time.Duration written as "30s", "5m".
type Duration time.Duration

// UnmarshalYAML implements yaml.Unmarshaler.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil || v < 0 {
		return fmt.Errorf("line %d: invalid duration %q (want e.g. 30s, 5m)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

func (e *Executor) validate() error {
	switch e.Sandbox {
	case "", "runc", "unsandboxed", "noop":
	default:
		return fmt.Errorf("executor.sandbox: %q is not one of runc, unsandboxed, noop", e.Sandbox)
	}
	switch {
	case e.Slots < 0:
		return errors.New("executor.slots: must not be negative")
	case e.Prewarm != nil && *e.Prewarm < 0:
		return errors.New("executor.prewarm: must not be negative")
	case e.Reuse != nil && *e.Reuse < 1:
		return errors.New("executor.reuse: must be at least 1")
	case e.DefaultTimeout < 0:
		return errors.New("executor.default_timeout: must not be negative")
	case e.MaxTimeout < 0:
		return errors.New("executor.max_timeout: must not be negative")
	case e.CacheSize < 0:
		return errors.New("executor.cache_size: must not be negative")
	case e.Limits.Memory < 0 || e.Limits.Pids < 0 || e.Limits.CPUs < 0:
		return errors.New("executor.limits: must not be negative")
	}
	for _, p := range e.HostPaths {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p {
			return fmt.Errorf("executor.host_paths: %q is not a clean absolute path", p)
		}
	}
	return nil
}

func (s *Scheduler) validate() error {
	switch {
	case s.HeartbeatInterval < 0, s.WorkerTimeout < 0, s.RetainCompleted < 0, s.PlatformGrace < 0:
		return errors.New("scheduler: durations must not be negative")
	case s.MaxAttempts < 0:
		return errors.New("scheduler.max_attempts: must not be negative")
	}
	seen := map[string]bool{}
	for i, p := range s.Peers {
		if p.ID == "" || p.Raft == "" {
			return fmt.Errorf("scheduler.peers[%d]: id and raft are required", i)
		}
		if seen[p.ID] {
			return fmt.Errorf("scheduler.peers[%d]: id %q given twice", i, p.ID)
		}
		seen[p.ID] = true
	}
	return nil
}
