package sandbox

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "github.com/opencontainers/cgroups/devices" // device rules need the devices cgroup driver
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	_ "github.com/opencontainers/runc/libcontainer/nsenter" // cgo: nsexec runs before the Go runtime in `init`
	"github.com/opencontainers/runc/libcontainer/seccomp"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func init() {
	// runc re-executes this binary as the container's init ("init" with
	// the sync pipes in the environment); that must happen before main.
	if len(os.Args) > 1 && os.Args[1] == "init" && os.Getenv("_LIBCONTAINER_INITPIPE") != "" {
		libcontainer.Init() // never returns
	}
}

// RuncOptions configure the libcontainer backend.
type RuncOptions struct {
	// Dir holds the sandboxes' directories (slots/, trash/, hostroot/).
	// It must be on the same file system as the executor's file cache,
	// so that inputs can be hardlinked.
	Dir string
	// StateDir is libcontainer's state root (default Dir/state, or a
	// directory under /run/tvixfarm when Dir/state would be in the
	// directory of this binary, where libcontainer could not seal its
	// copy of the binary cheaply).
	StateDir string
	// CgroupParent is the cgroup, relative to the executor's own, under
	// which each sandbox gets its own. It must be this backend's alone:
	// at start, every process in it is killed (default "tvixfarm/" and a
	// hash of Dir, so backends with different directories never meet).
	CgroupParent string
	// Prewarm is how many sandboxes to keep prepared ahead of time
	// (0: none; sandboxes are then created when a command runs).
	Prewarm int
	// Seed are the shapes to prepare before the first action arrives; the
	// pool then follows the shapes of the actions that run.
	Seed []Shape
	// Reuse is how many commands one sandbox of a Nix action (the Chroot
	// layout, without the host's network) runs before it is destroyed,
	// each in new namespaces cloned by the sandbox's stub (reuse.go).
	// 0 or 1: a new container for every command.
	Reuse int
	// Defaults are the limits of an action that asks for none.
	Defaults Limits
	// HostPaths are the host files and directories the HostRoot layout
	// mounts read-only (default DefaultHostPaths).
	HostPaths []string
	// BuildUsers are the host users and group that the builders of Nix
	// actions (the Chroot layout) run as (default DefaultBuildUsers).
	BuildUsers BuildUsers
	// Logger receives warnings about cleanup; nil means slog.Default().
	Logger *slog.Logger
}

// DefaultHostPaths are the host paths the HostRoot layout exposes: the
// programs and libraries, and the /etc files they need to run. Never
// /root, /home, the farm's data or other actions' trees.
var DefaultHostPaths = []string{
	"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr",
	"/etc/alternatives", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
	"/etc/localtime", "/etc/ssl", "/etc/ca-certificates",
}

// BuildUsers are host ids for the builders of Nix actions, as Nix's
// build-users-group (nixbld, with users nixbld1...) is: each sandbox of
// the Chroot layout runs as a uid of its own from the range, with the
// group, and sees them as uid 1000 and gid 100 in its user namespace. The
// ids need no /etc/passwd entries, but no real user or group may have
// them: a build can read what its host uid or gid can read.
type BuildUsers struct {
	// FirstUID and Count are the range of host uids; a sandbox holds one
	// from its creation (prepared sandboxes included) to its destruction,
	// so Count bounds the sandboxes of Nix actions that exist at once.
	FirstUID, Count int
	// GID is the host group of all of them. It owns (with root as owner)
	// the root directory and /nix/store of their sandboxes.
	GID int
}

// DefaultBuildUsers are ids far from those of real users (below 65536),
// of subordinate id ranges (useradd allocates from 100000 up to
// 600100000), of systemd-nspawn's containers (524288 to 1879048191) and
// of Nix's auto-allocate-uids (872415232 onwards, 8388608 ids): systemd
// leaves 0x70000000 to 0x7ffdffff unused.
var DefaultBuildUsers = BuildUsers{FirstUID: 0x70000000, Count: 4096, GID: 0x70000000}

func (u BuildUsers) check() error {
	bad := func(id int) bool { return id <= 0 || id == 65534 || id == 65535 || id >= 1<<32-1 }
	switch {
	case u.Count <= 0:
		return fmt.Errorf("sandbox: build users: count %d must be positive", u.Count)
	case bad(u.FirstUID) || bad(u.FirstUID+u.Count-1) || u.FirstUID <= 65535 && u.FirstUID+u.Count-1 >= 65534:
		return fmt.Errorf("sandbox: build users: uids %d to %d must not include root, nobody or -1", u.FirstUID, u.FirstUID+u.Count-1)
	case bad(u.GID):
		return fmt.Errorf("sandbox: build users: gid %d must not be root's, nogroup or -1", u.GID)
	}
	return nil
}

// Runc is the sandbox backend built on runc's libcontainer, embedded in
// this binary: namespaces mount, pid, ipc, uts and (unless the shape asks
// for the host's) network; a cgroup per sandbox with memory, pids and CPU
// limits; uid 1000, gid 100, no capabilities, no new privileges and a
// seccomp filter like Nix's; a read-only root. Nix actions (the Chroot
// layout) also get a user namespace, made by the stub (userns.go), in
// which only uid 1000 and gid 100 exist, mapped to a host build user of
// the sandbox's own and the build group (BuildUsers).
type Runc struct {
	opts     RuncOptions
	log      *slog.Logger
	slots    string
	hostroot string
	exe      string

	ctx     context.Context
	cancel  context.CancelFunc
	created atomic.Int64   // containers created, for tests
	wg      sync.WaitGroup // preparing and destroying sandboxes
	trashWG sync.WaitGroup
	trash   *trash

	mu        sync.Mutex
	pool      []*runcInstance // prepared, oldest first
	preparing int
	closed    bool
	uids      map[int]bool // build uids held by sandboxes
	nextUID   int          // where the search for a free one starts
}

// NewRunc sets the backend up: it recovers what a crashed executor left
// behind (containers, cgroups, directories), prepares the HostRoot
// skeleton and starts preparing the seed shapes.
func NewRunc(opts RuncOptions) (*Runc, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the runc sandbox needs root (cgroup v1 limits and namespaces)")
	}
	if !seccomp.Enabled {
		return nil, ErrNoSeccomp
	}
	if opts.Dir == "" {
		return nil, errors.New("sandbox directory not set")
	}
	defaultState := opts.StateDir == ""
	if defaultState {
		opts.StateDir = filepath.Join(opts.Dir, "state")
	}
	if opts.CgroupParent == "" {
		p, err := defaultCgroupParent(opts.Dir)
		if err != nil {
			return nil, err
		}
		opts.CgroupParent = p
	}
	if opts.HostPaths == nil {
		opts.HostPaths = DefaultHostPaths
	}
	if opts.BuildUsers == (BuildUsers{}) {
		opts.BuildUsers = DefaultBuildUsers
	}
	if err := opts.BuildUsers.check(); err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("sandbox: find own executable: %w", err)
	}
	if err := checkStatic(exe); err != nil {
		return nil, err
	}
	if defaultState && nested(filepath.Dir(exe), opts.StateDir) {
		// libcontainer seals its copy of this binary for runc's init with
		// an overlay of the binary's directory and the state directory;
		// overlayfs refuses nested lowerdirs, and libcontainer then copies
		// the whole binary for every container instead.
		sum := sha256.Sum256([]byte(opts.StateDir))
		opts.StateDir = filepath.Join("/run/tvixfarm", "state-"+hex.EncodeToString(sum[:6]))
	}
	b := &Runc{
		opts:     opts,
		log:      log,
		slots:    filepath.Join(opts.Dir, "slots"),
		hostroot: filepath.Join(opts.Dir, "hostroot"),
		exe:      exe,
		uids:     make(map[int]bool),
	}
	for _, d := range []string{opts.Dir, opts.StateDir, b.slots} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
	}
	b.ctx, b.cancel = context.WithCancel(context.Background())
	// Overlays and shared binds of sandboxes outlive a killed executor:
	// detach them before anything below is removed.
	for _, d := range []string{filepath.Join(opts.Dir, "slots"), filepath.Join(opts.Dir, "trash")} {
		if err := unmountUnder(d); err != nil {
			return nil, err
		}
	}
	b.trash, err = newTrash(b.ctx, filepath.Join(opts.Dir, "trash"), log, &b.trashWG)
	if err != nil {
		return nil, err
	}
	if err := b.recover(); err != nil {
		return nil, err
	}
	if err := b.makeHostRoot(); err != nil {
		return nil, err
	}
	for _, s := range opts.Seed {
		if err := s.Normalize(); err != nil {
			return nil, fmt.Errorf("sandbox seed shape: %w", err)
		}
		b.prepare(s)
	}
	return b, nil
}

// ErrNoSeccomp is returned by NewRunc when the binary was built without
// libseccomp: the sandbox would lack Nix's syscall filter.
var ErrNoSeccomp = errors.New("this binary was built without seccomp support: build it with -tags seccomp (and libseccomp-dev installed)")

// ErrNotStatic is returned by NewRunc for a dynamically linked binary:
// the sandbox's first program is this binary, run inside a root file
// system that has no dynamic loader.
var ErrNotStatic = errors.New("the executor binary must be statically linked for the runc sandbox: build it with `make build` (go build -tags seccomp,netgo,osusergo -ldflags=-extldflags=-static)")

func checkStatic(exe string) error {
	f, err := elf.Open(exe)
	if err != nil {
		return fmt.Errorf("sandbox: inspect %s: %w", exe, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return ErrNotStatic
		}
	}
	return nil
}

// defaultCgroupParent is the cgroup parent of a backend in dir. Recovery
// kills everything under the parent, so executors that share a host (a
// local cluster, parallel tests) must not share it; a restarted executor
// (the same dir) finds its own.
// nested reports whether one of the directories a and b is in the other.
func nested(a, b string) bool {
	a, errA := filepath.Abs(a)
	b, errB := filepath.Abs(b)
	if errA != nil || errB != nil {
		return false
	}
	return within(strings.TrimPrefix(b, "/"), strings.TrimPrefix(a, "/")) || within(strings.TrimPrefix(a, "/"), strings.TrimPrefix(b, "/"))
}

func defaultCgroupParent(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("sandbox: %w", err)
	}
	sum := sha256.Sum256([]byte(abs))
	return "tvixfarm/" + hex.EncodeToString(sum[:6]), nil
}

// recover destroys the containers and removes the directories that an
// executor which crashed left behind. A killed executor's containers keep
// running (runc's parent-death signal does not reach the final process),
// so they are killed here.
func (b *Runc) recover() error {
	ents, err := os.ReadDir(b.opts.StateDir)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	for _, e := range ents {
		id := e.Name()
		c, err := libcontainer.Load(b.opts.StateDir, id)
		if err != nil {
			b.log.Warn("sandbox: cannot load leftover container; removing its state", "id", id, "err", err)
			os.RemoveAll(filepath.Join(b.opts.StateDir, id))
			continue
		}
		destroyContainer(c)
		b.log.Info("sandbox: destroyed a container left by a previous run", "id", id)
	}
	removeCgroups(b.opts.CgroupParent, b.log)
	slots, err := os.ReadDir(b.slots)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	for _, s := range slots {
		b.trash.put(filepath.Join(b.slots, s.Name()))
	}
	return nil
}

// destroyContainer kills a container's processes and removes its cgroup
// and state.
func destroyContainer(c *libcontainer.Container) {
	if st, err := c.Status(); err == nil && st != libcontainer.Stopped {
		c.Signal(unix.SIGKILL)
		for i := 0; i < 500; i++ { // the kernel tears the pid namespace down
			if st, err := c.Status(); err != nil || st == libcontainer.Stopped {
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	c.Destroy()
}

// removeCgroups kills the processes of and removes every cgroup left under
// parent in each v1 hierarchy (and v2), relative to our own cgroups.
func removeCgroups(parent string, log *slog.Logger) {
	own, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return
	}
	for _, line := range strings.Split(strings.TrimSpace(string(own)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		ctrl := f[1]
		switch {
		case ctrl == "":
			ctrl = "unified"
		case strings.HasPrefix(ctrl, "name="):
			ctrl = strings.TrimPrefix(ctrl, "name=")
		}
		dir := filepath.Join("/sys/fs/cgroup", strings.Split(ctrl, ",")[0], f[2], parent)
		subs, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, s := range subs {
			if !s.IsDir() {
				continue
			}
			cg := filepath.Join(dir, s.Name())
			if procs, err := os.ReadFile(filepath.Join(cg, "cgroup.procs")); err == nil {
				for _, p := range strings.Fields(string(procs)) {
					if pid, err := strconv.Atoi(p); err == nil {
						unix.Kill(pid, unix.SIGKILL)
					}
				}
			}
			for i := 0; i < 100; i++ {
				if err := unix.Rmdir(cg); err == nil || errors.Is(err, unix.ENOENT) {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			if _, err := os.Stat(cg); err == nil {
				log.Warn("sandbox: cannot remove leftover cgroup", "path", cg)
			}
		}
	}
}

// Acquire returns a prepared sandbox of shape s if there is one, else a
// new one that is created when its command runs (after the caller has
// filled its input root).
func (b *Runc) Acquire(ctx context.Context, s Shape) (Instance, error) {
	if err := s.Normalize(); err != nil {
		return nil, err
	}
	key := s.Key()
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil, errors.New("sandbox: closed")
	}
	for i, in := range b.pool {
		if in.shape.Key() == key {
			b.pool = append(b.pool[:i], b.pool[i+1:]...)
			b.mu.Unlock()
			in.shape.Limits = s.Limits
			return in, nil
		}
	}
	b.mu.Unlock()
	in, err := b.newInstance(s)
	if err != nil {
		return nil, err
	}
	return in, nil
}

// prepare creates a sandbox of shape s in the background and adds it to
// the pool. Shapes that share the host network are never prepared: their
// /etc mountpoints would collide with the input root.
func (b *Runc) prepare(s Shape) {
	if b.opts.Prewarm <= 0 || s.Network == NetworkHost {
		return
	}
	b.mu.Lock()
	if b.closed || len(b.pool)+b.preparing >= b.opts.Prewarm+1 {
		b.mu.Unlock()
		return
	}
	b.preparing++
	b.mu.Unlock()
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		in, err := b.newInstance(s)
		if err == nil {
			err = in.create()
		}
		b.mu.Lock()
		b.preparing--
		if err != nil || b.closed {
			b.mu.Unlock()
			if err != nil {
				b.log.Warn("sandbox: preparing a sandbox failed", "err", err)
			}
			if in != nil {
				in.release(false) // a failing preparation is not retried in a loop
			}
			return
		}
		in.warm = true
		b.pool = append(b.pool, in)
		var evict *runcInstance
		if len(b.pool) > b.opts.Prewarm {
			evict, b.pool = b.pool[0], b.pool[1:]
		}
		b.mu.Unlock()
		if evict != nil {
			evict.release(false) // no replacement: that would evict again
		}
	}()
}

// Prepared is the number of sandboxes prepared and waiting for a command.
func (b *Runc) Prepared() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.pool)
}

// Close destroys the prepared sandboxes and waits for background work.
func (b *Runc) Close() error {
	b.mu.Lock()
	b.closed = true
	pool := b.pool
	b.pool = nil
	b.mu.Unlock()
	for _, in := range pool {
		in.release(false)
	}
	b.wg.Wait()
	b.cancel()
	b.trashWG.Wait()
	return nil
}

// runcInstance is one sandbox: a directory (slots/<id>) holding the input
// root and the captured streams, and a container whose pid 1 is the stub.
type runcInstance struct {
	b     *Runc
	id    string
	shape Shape
	dir   string
	root  string
	warm  bool
	// uid and gid are the host ids the command runs as; a build uid
	// (ownUID) is returned to the range when the sandbox is destroyed.
	uid, gid int
	ownUID   bool

	stdout, stderr *os.File
	c              *libcontainer.Container
	proc           *libcontainer.Process
	ctl            *net.UnixConn
	memCgroup      string
	createTime     time.Duration
	released       bool
	waiting        bool   // Run reaps the process; else Release does
	mounted        bool   // something may be mounted below dir
	overlayDone    func() // called once the overlay is unmounted
	lowerMounts    bool   // the overlay has a level of lower overlays

	// A reusable sandbox (reuse.go) runs several commands.
	reuse    bool
	conn     *stubConn
	uses     int      // commands started
	broken   bool     // the last command's end was not reported: destroy
	useFiles []string // the last command's captured streams
	oomBase  int      // the cgroup's OOM kills before the command
	stubPid  int      // the zygote, on the host
	layers   []string // of the overlay, to mount it again in create
}

func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return "tf-" + hex.EncodeToString(b[:])
}

// allocUID takes a free build uid.
func (b *Runc) allocUID() (int, error) {
	u := b.opts.BuildUsers
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := 0; i < u.Count; i++ {
		uid := u.FirstUID + (b.nextUID+i)%u.Count
		if !b.uids[uid] {
			b.uids[uid] = true
			b.nextUID = (b.nextUID + i + 1) % u.Count
			return uid, nil
		}
	}
	return 0, fmt.Errorf("sandbox: all %d build users (uids %d...) are in use", u.Count, u.FirstUID)
}

func (b *Runc) freeUID(uid int) {
	b.mu.Lock()
	delete(b.uids, uid)
	b.mu.Unlock()
}

func (b *Runc) newInstance(s Shape) (*runcInstance, error) {
	in := &runcInstance{b: b, id: newID(), shape: s, uid: UID, gid: GID, reuse: b.reusable(s)}
	if s.Layout == Chroot {
		uid, err := b.allocUID()
		if err != nil {
			return nil, err
		}
		in.uid, in.gid, in.ownUID = uid, b.opts.BuildUsers.GID, true
	}
	in.dir = filepath.Join(b.slots, in.id)
	in.root = filepath.Join(in.dir, "root")
	if err := os.MkdirAll(in.root, 0o755); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	for _, w := range s.Writable {
		if err := os.MkdirAll(filepath.Join(in.root, w), 0o755); err != nil {
			in.release(false)
			return nil, fmt.Errorf("sandbox: writable directory %q: %w", w, err)
		}
	}
	if s.Overlay != "" {
		in.mounted = true
		if err := makeShared(filepath.Join(in.root, s.Overlay)); err != nil {
			in.release(false)
			return nil, err
		}
	}
	var err error
	if in.stdout, err = os.OpenFile(filepath.Join(in.dir, "stdout"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err == nil {
		in.stderr, err = os.OpenFile(filepath.Join(in.dir, "stderr"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	}
	if err != nil {
		in.release(false)
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	return in, nil
}

func (in *runcInstance) InputRoot() string { return in.root }

// BuildUser is the sandbox's build uid and the build group for the Chroot
// layout, else uid 1000 and gid 100.
func (in *runcInstance) BuildUser() (uid, gid int) { return in.uid, in.gid }

// Overlay mounts the layers at the shape's overlay directory. In a
// prepared sandbox the mount propagates into the container, whose copy of
// the directory is a slave of the shared mount newInstance made.
func (in *runcInstance) Overlay(layers []string, done func()) error {
	if in.shape.Overlay == "" || in.overlayDone != nil {
		if done != nil {
			done()
		}
		return errors.New("sandbox: the shape has no overlay directory, or it is mounted already")
	}
	if done == nil {
		done = func() {}
	}
	in.overlayDone = done
	in.lowerMounts = len(layers) > maxLayers
	in.layers = layers
	return overlay(filepath.Join(in.root, in.shape.Overlay), in.dir, layers)
}

// create makes the container and starts the stub in it, and returns once
// the stub is ready for a command.
func (in *runcInstance) create() (err error) {
	t0 := time.Now()
	in.b.created.Add(1)
	if in.reuse && in.overlayDone != nil {
		// The container's mounts would hold copies of the overlay that
		// unmounting it on the host later does not remove; it is mounted
		// again once the container exists, and then propagates.
		target := filepath.Join(in.root, in.shape.Overlay)
		var st unix.Stat_t
		if err := unix.Stat(target, &st); err != nil {
			return fmt.Errorf("sandbox: %w", err)
		}
		if err := in.unmountOverlay(); err != nil {
			return err
		}
		defer func() {
			if err == nil {
				err = overlay(target, in.dir, in.layers)
			}
			if err == nil {
				// The caller may have set the owner and mode of the
				// overlay's root already.
				err = errors.Join(os.Chown(target, int(st.Uid), int(st.Gid)), unix.Chmod(target, st.Mode&0o7777))
			}
		}()
	}
	if in.reuse && in.shape.Layout == HostRoot {
		if err := os.Mkdir(in.tmpDir(), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("sandbox: %w", err)
		}
	}
	if in.shape.Layout == Chroot {
		// runc gives a tmpfs the mode of its mountpoint.
		if err := os.MkdirAll(filepath.Join(in.root, "tmp"), 0o755); err != nil {
			return fmt.Errorf("sandbox: %w", err)
		}
		if err := os.Chmod(filepath.Join(in.root, "tmp"), os.ModeSticky|0o777); err != nil {
			return fmt.Errorf("sandbox: %w", err)
		}
		if in.shape.Network == NetworkHost {
			if err := in.hostNetworkFiles(); err != nil {
				return err
			}
		}
	}
	spec, err := in.b.spec(in)
	if err != nil {
		return err
	}
	cfg, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{
		CgroupName: in.id,
		Spec:       spec,
	})
	if err != nil {
		return fmt.Errorf("sandbox: container config: %w", err)
	}
	c, err := libcontainer.Create(in.b.opts.StateDir, in.id, cfg)
	if err != nil {
		return fmt.Errorf("sandbox: create container: %w", err)
	}
	in.c = c
	exe, err := os.Open(in.b.exe)
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	defer exe.Close()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sandbox: socketpair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "ctl"), os.NewFile(uintptr(fds[1]), "ctl-stub")
	defer theirs.Close()
	fc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	in.ctl = fc.(*net.UnixConn)
	nnp := true
	env := []string{stubEnv + "=1"}
	switch {
	case in.reuse:
		env = append(env, fmt.Sprintf("%s=%d:%d", stubReuseEnv, UID, GID))
		in.conn = &stubConn{in: in}
	case in.shape.Layout == Chroot:
		env = append(env, fmt.Sprintf("%s=%d:%d", stubUsernsEnv, UID, GID))
	}
	in.proc = &libcontainer.Process{
		Args:            []string{fmt.Sprintf("/proc/self/fd/%d", stubExeFd), "sandbox-stub"},
		Env:             env,
		UID:             in.uid,
		GID:             in.gid,
		Cwd:             "/",
		Stdout:          in.stdout,
		Stderr:          in.stderr,
		ExtraFiles:      []*os.File{exe, theirs},
		Init:            true,
		NoNewPrivileges: &nnp,
		Capabilities:    &configs.Capabilities{},
		Rlimits:         []configs.Rlimit{{Type: unix.RLIMIT_CORE}},
	}
	if err := c.Run(in.proc); err != nil {
		return fmt.Errorf("sandbox: start container: %w", err)
	}
	if st, err := c.State(); err == nil {
		if p := st.CgroupPaths["memory"]; p != "" {
			in.memCgroup = p
		}
	}
	if pid, err := in.proc.Pid(); err == nil {
		in.stubPid = pid
	}
	in.ctl.SetReadDeadline(time.Now().Add(30 * time.Second))
	var ready [1]byte
	if _, err := io.ReadFull(in.ctl, ready[:]); err != nil || ready[0] != 'R' {
		return fmt.Errorf("sandbox: stub did not start: %v%s", err, in.tail(in.stderr))
	}
	in.ctl.SetReadDeadline(time.Time{})
	in.createTime = time.Since(t0)
	return nil
}

// tail returns the end of a captured stream, for error messages.
func (in *runcInstance) tail(f *os.File) string {
	b, _ := os.ReadFile(f.Name())
	if len(b) > 1024 {
		b = b[len(b)-1024:]
	}
	if len(b) == 0 {
		return ""
	}
	return ": " + strings.TrimSpace(string(b))
}

// hostNetworkFiles creates the mountpoints of the host's network files in
// a chroot, and the nsswitch.conf Nix generates for fixed-output builds.
func (in *runcInstance) hostNetworkFiles() error {
	etc := filepath.Join(in.root, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("sandbox: %w", err)
	}
	for _, f := range []string{"resolv.conf", "hosts", "services", "nsswitch.conf"} {
		p := filepath.Join(etc, f)
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				return fmt.Errorf("sandbox: %w", err)
			}
		}
	}
	return os.WriteFile(filepath.Join(in.dir, "nsswitch.conf"), []byte("hosts: files dns\nservices: files\n"), 0o644)
}

// Run starts the command in the sandbox (creating the sandbox first if it
// was not prepared) and waits for it.
func (in *runcInstance) Run(ctx context.Context, cmd *Command) (*Result, error) {
	if len(cmd.Args) == 0 {
		return nil, errors.New("sandbox: no command")
	}
	if in.c == nil {
		if err := in.create(); err != nil {
			return nil, err
		}
	}
	dir := "/" + cmd.Dir
	if in.shape.Layout == HostRoot {
		dir = InputRootPath + "/" + cmd.Dir
	}
	args := append([]string(nil), cmd.Args...)
	if cmd.Argv0 != "" {
		args[0] = cmd.Argv0
	}
	msg := encodeStubRequest(stubRequest{Path: cmd.Args[0], Args: args, Env: cmd.Env, Dir: path.Clean(dir), PTY: cmd.PTY})
	if len(msg)-4 > maxStubRequest {
		return nil, fmt.Errorf("sandbox: command and environment too large (%d bytes)", len(msg)-4)
	}
	if in.reuse {
		return in.runReused(ctx, cmd, msg)
	}
	res := &Result{Warm: in.warm, Stdout: in.stdout.Name(), Stderr: in.stderr.Name()}
	if !in.warm {
		res.Timings.Create = in.createTime
	}
	t0 := time.Now()
	if err := in.setLimits(); err != nil {
		return nil, err
	}
	if _, err := in.ctl.Write(msg); err != nil {
		return nil, fmt.Errorf("sandbox: send command to stub: %w", err)
	}

	// Wait for the process first: it must be reaped whatever happens.
	type waited struct {
		st  *os.ProcessState
		err error
	}
	done := make(chan waited, 1)
	in.waiting = true
	go func() {
		st, err := in.proc.Wait()
		done <- waited{st, err}
	}()

	var ptyDone chan struct{}
	startErr, userErr := in.awaitExec(cmd.PTY, &ptyDone)
	res.Started = time.Now()
	res.Timings.Start = res.Started.Sub(t0)
	if startErr != nil {
		in.c.Signal(unix.SIGKILL)
		<-done
		return nil, startErr
	}

	timeout := cmd.Timeout
	var timer <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timer = t.C
	}
	var w waited
	select {
	case w = <-done:
	case <-timer:
		res.TimedOut = true
		in.c.Signal(unix.SIGKILL)
		w = <-done
	case <-ctx.Done():
		in.c.Signal(unix.SIGKILL)
		<-done
		return nil, ctx.Err()
	}
	res.Exited = time.Now()
	if ptyDone != nil {
		<-ptyDone
	}
	if w.st == nil {
		return nil, fmt.Errorf("sandbox: wait: %w", w.err)
	}
	res.setExit(w.st)
	res.OOMKilled = in.oomKilled()
	if userErr != "" {
		fmt.Fprintf(in.stderr, "tvixfarm sandbox: %s\n", userErr)
	}
	res.Timings.Wait = time.Since(res.Exited)
	return res, nil
}

// awaitExec reads the stub's answers until the command was exec'ed
// (EOF). It returns a sandbox failure, or a message for a command that
// could not start (a result, exit code 127).
func (in *runcInstance) awaitExec(pty bool, ptyDone *chan struct{}) (error, string) {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4))
	for {
		n, oobn, _, _, err := in.ctl.ReadMsgUnix(buf, oob)
		if n == 0 && (err == nil || errors.Is(err, io.EOF)) {
			if pty && *ptyDone == nil {
				return errors.New("sandbox: stub exec'ed without a pty"), ""
			}
			return nil, ""
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("sandbox: stub: %w", err), ""
		}
		switch buf[0] {
		case 'P':
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil || len(msgs) != 1 {
				return fmt.Errorf("sandbox: pty from stub: %v", err), ""
			}
			fds, err := unix.ParseUnixRights(&msgs[0])
			if err != nil || len(fds) != 1 {
				return fmt.Errorf("sandbox: pty from stub: %v", err), ""
			}
			master := os.NewFile(uintptr(fds[0]), "pty")
			ch := make(chan struct{})
			*ptyDone = ch
			go func() {
				defer close(ch)
				defer master.Close()
				io.Copy(in.stdout, master) // ends with EIO when the last holder of the slave exits
			}()
			if n > 1 {
				buf = append(buf[:0], buf[1:n]...)
			}
		case 'E':
			// The stub exits 127 after this: the command's own failure.
			rest, _ := io.ReadAll(in.ctl)
			return nil, string(buf[1:n]) + string(rest)
		default:
			return fmt.Errorf("sandbox: unexpected message %q from stub", buf[:n]), ""
		}
	}
}

// setLimits applies the shape's limits (or the defaults) to the cgroup.
func (in *runcInstance) setLimits() error {
	want := resources(in.shape.Limits, in.b.opts.Defaults)
	cfg := in.c.Config()
	have := cfg.Cgroups.Resources
	if have.Memory == want.Memory && have.PidsLimit == want.PidsLimit && have.CpuQuota == want.CpuQuota {
		return nil
	}
	have.Memory, have.MemorySwap = want.Memory, want.MemorySwap
	have.PidsLimit = want.PidsLimit
	have.CpuQuota, have.CpuPeriod = want.CpuQuota, want.CpuPeriod
	if err := in.c.Set(cfg); err != nil {
		return fmt.Errorf("sandbox: set limits: %w", err)
	}
	return nil
}

type limitValues struct {
	Memory, MemorySwap int64
	PidsLimit          int64
	CpuQuota           int64
	CpuPeriod          uint64
}

func resources(l, def Limits) limitValues {
	if l.MemoryBytes == 0 {
		l.MemoryBytes = def.MemoryBytes
	}
	if l.Pids == 0 {
		l.Pids = def.Pids
	}
	if l.CPUs == 0 {
		l.CPUs = def.CPUs
	}
	v := limitValues{Memory: l.MemoryBytes, MemorySwap: l.MemoryBytes, PidsLimit: l.Pids}
	if l.CPUs > 0 {
		v.CpuPeriod = 100000
		v.CpuQuota = int64(l.CPUs * 100000)
	}
	return v
}

// oomKilled reports whether the cgroup's OOM kill counter grew during
// the command.
func (in *runcInstance) oomKilled() bool { return in.oomCount() > in.oomBase }

// oomCount reads the cgroup's OOM kill counter (memory.failcnt stays 0
// on this kernel; oom_kill is reliable).
func (in *runcInstance) oomCount() int {
	if in.memCgroup == "" {
		return 0
	}
	b, err := os.ReadFile(filepath.Join(in.memCgroup, "memory.oom_control"))
	if err != nil {
		b, err = os.ReadFile(filepath.Join(in.memCgroup, "memory.events"))
		if err != nil {
			return 0
		}
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// Release destroys the container and removes the directory in the
// background; a prepared sandbox of the same shape takes its place. A
// reusable sandbox is emptied and goes back to the pool instead.
func (in *runcInstance) Release() {
	if in.recycle() {
		b := in.b
		b.mu.Lock()
		if !b.closed {
			b.pool = append(b.pool, in)
			var evict *runcInstance
			if len(b.pool) > max(b.opts.Prewarm, 1) {
				evict, b.pool = b.pool[0], b.pool[1:]
			}
			b.mu.Unlock()
			if evict != nil {
				evict.release(false)
			}
			return
		}
		b.mu.Unlock()
	}
	in.release(true)
}

// release destroys the sandbox and, if refill, prepares another of its
// shape.
func (in *runcInstance) release(refill bool) {
	if in.released {
		return
	}
	in.released = true
	b := in.b
	if in.ctl != nil {
		in.ctl.Close()
	}
	for _, f := range []*os.File{in.stdout, in.stderr} {
		if f != nil {
			f.Close()
		}
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		if in.c != nil {
			destroyContainer(in.c)
			if in.proc != nil && !in.waiting {
				in.proc.Wait() // reap the stub of a sandbox that ran nothing
			}
		}
		if in.ownUID {
			// No process of the sandbox is left: another may have the uid.
			// (Its files, in the directory removed below, are not
			// reachable from another sandbox.)
			b.freeUID(in.uid)
		}
		if in.mounted {
			if err := unmountUnder(in.dir); err != nil {
				// Never remove a tree with mounts in it, nor let its
				// layers go.
				b.log.Error("sandbox: cannot unmount; leaving the directory", "dir", in.dir, "err", err)
				return
			}
		}
		if in.overlayDone != nil {
			in.overlayDone()
		}
		b.trash.put(in.dir)
	}()
	if refill {
		b.prepare(in.shape)
	}
}

// spec is the OCI runtime spec of a sandbox.
func (b *Runc) spec(in *runcInstance) (*specs.Spec, error) {
	s := in.shape
	ro := []string{"rbind", "ro", "nosuid", "nodev"}
	rw := []string{"rbind", "rw", "nosuid", "nodev"}
	mounts := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=50%"}},
	}
	if in.reuse {
		// A directory emptied between commands; in the Chroot layout, as
		// under Nix, the root's own /tmp.
		mounts = append(mounts, specs.Mount{Destination: "/tmp", Type: "bind", Source: in.tmpDir(), Options: []string{"rbind", "rw", "nosuid", "nodev"}})
	} else {
		mounts = append(mounts, specs.Mount{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}})
	}
	rootPath, rootRO := in.root, true
	inside := "/"
	if s.Layout == HostRoot {
		rootPath = b.hostroot
		inside = InputRootPath
		for _, p := range b.opts.HostPaths {
			if fi, err := os.Lstat(p); err == nil && fi.Mode()&os.ModeSymlink == 0 {
				mounts = append(mounts, specs.Mount{Destination: p, Type: "bind", Source: p, Options: ro})
			}
		}
		if len(s.Writable) == 0 || s.Writable[0] != "" {
			mounts = append(mounts, specs.Mount{Destination: InputRootPath, Type: "bind", Source: in.root, Options: ro})
		}
	}
	for _, w := range s.Writable {
		if w == "" && s.Layout == Chroot {
			rootRO = false
			continue
		}
		mounts = append(mounts, specs.Mount{Destination: path.Join(inside, w), Type: "bind", Source: filepath.Join(in.root, w), Options: rw})
	}
	ns := []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}}
	if s.Network == NetworkHost {
		for _, f := range []string{"resolv.conf", "hosts", "services"} {
			if _, err := os.Stat("/etc/" + f); err == nil {
				mounts = append(mounts, specs.Mount{Destination: "/etc/" + f, Type: "bind", Source: "/etc/" + f, Options: ro})
			}
		}
		mounts = append(mounts, specs.Mount{Destination: "/etc/nsswitch.conf", Type: "bind", Source: filepath.Join(in.dir, "nsswitch.conf"), Options: ro})
		if s.Layout == HostRoot {
			if err := os.WriteFile(filepath.Join(in.dir, "nsswitch.conf"), []byte("hosts: files dns\nservices: files\n"), 0o644); err != nil {
				return nil, fmt.Errorf("sandbox: %w", err)
			}
		}
	} else {
		ns = append(ns, specs.LinuxNamespace{Type: specs.NetworkNamespace})
	}
	lim := resources(s.Limits, b.opts.Defaults)
	res := &specs.LinuxResources{
		Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
	}
	if lim.Memory > 0 {
		res.Memory = &specs.LinuxMemory{Limit: &lim.Memory, Swap: &lim.MemorySwap}
	}
	if lim.PidsLimit > 0 {
		res.Pids = &specs.LinuxPids{Limit: lim.PidsLimit}
	}
	if lim.CpuQuota > 0 {
		res.CPU = &specs.LinuxCPU{Quota: &lim.CpuQuota, Period: &lim.CpuPeriod}
	}
	masked := []string{"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
		"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"}
	readonly := []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
	if in.reuse {
		// A new procfs can be mounted only where the container's is
		// wholly visible: each command's own /proc gets these masks
		// (tf_masked and tf_readonly in stubc.go). The zygote runs
		// nothing of the build's.
		masked, readonly = nil, nil
	}
	return &specs.Spec{
		Version:  specs.Version,
		Root:     &specs.Root{Path: rootPath, Readonly: rootRO},
		Hostname: "localhost",
		Mounts:   mounts,
		Process:  &specs.Process{Cwd: "/"},
		Linux: &specs.Linux{
			CgroupsPath:   path.Join(b.opts.CgroupParent, in.id),
			Resources:     res,
			Namespaces:    ns,
			MaskedPaths:   masked,
			ReadonlyPaths: readonly,
			Seccomp:       nixSeccomp(),
		},
	}, nil
}

// nixSeccomp is the filter Nix installs: no setuid or setgid bits (the
// build's files must not become privileged programs on the host) and no
// extended attributes (they are not part of a NAR).
func nixSeccomp() *specs.LinuxSeccomp {
	var calls []specs.LinuxSyscall
	for _, c := range []struct {
		name string
		arg  uint
	}{{"chmod", 1}, {"fchmod", 1}, {"fchmodat", 2}, {"fchmodat2", 2}} {
		for _, bit := range []uint64{unix.S_ISUID, unix.S_ISGID} {
			calls = append(calls, specs.LinuxSyscall{
				Names: []string{c.name}, Action: specs.ActErrno, ErrnoRet: ptr(uint(unix.EPERM)),
				Args: []specs.LinuxSeccompArg{{Index: c.arg, Value: bit, ValueTwo: bit, Op: specs.OpMaskedEqual}},
			})
		}
	}
	calls = append(calls, specs.LinuxSyscall{
		Names:  []string{"setxattr", "lsetxattr", "fsetxattr"},
		Action: specs.ActErrno, ErrnoRet: ptr(uint(unix.ENOTSUP)),
	})
	return &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchX86, specs.ArchX32},
		Syscalls:      calls,
	}
}

func ptr[T any](v T) *T { return &v }

// makeHostRoot prepares the shared, never-modified root file system of
// the HostRoot layout: every mountpoint exists in it (so runc never
// writes to it and sandboxes can share it), symlinks such as /bin ->
// usr/bin are copied, and /etc has Nix's passwd, group and hosts.
func (b *Runc) makeHostRoot() error {
	tmp := b.hostroot + ".tmp"
	os.RemoveAll(tmp)
	mk := func(p string, mode os.FileMode) error { return os.MkdirAll(filepath.Join(tmp, p), mode) }
	for _, d := range []string{"dev", "proc", "etc", strings.TrimPrefix(InputRootPath, "/")} {
		if err := mk(d, 0o755); err != nil {
			return fmt.Errorf("sandbox: host root: %w", err)
		}
	}
	if err := mk("tmp", 0o755); err != nil {
		return fmt.Errorf("sandbox: host root: %w", err)
	}
	if err := os.Chmod(filepath.Join(tmp, "tmp"), 0o1777); err != nil {
		return fmt.Errorf("sandbox: host root: %w", err)
	}
	for _, p := range b.opts.HostPaths {
		if err := checkHostPath(p, b.opts.Dir); err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return fmt.Errorf("sandbox: host path: %w", err)
		}
		dst := filepath.Join(tmp, p)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return fmt.Errorf("sandbox: host root: %w", err)
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err == nil {
				err = os.Symlink(target, dst)
			}
			if err != nil {
				return fmt.Errorf("sandbox: host root: %w", err)
			}
		case fi.IsDir():
			err = os.MkdirAll(dst, 0o755)
		default:
			err = os.WriteFile(dst, nil, 0o644)
		}
		if err != nil {
			return fmt.Errorf("sandbox: host root: %w", err)
		}
	}
	files := map[string]string{
		"etc/passwd": NixPasswd, "etc/group": NixGroup, "etc/hosts": NixHosts,
		"etc/resolv.conf": "", "etc/services": "", "etc/nsswitch.conf": "",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(tmp, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("sandbox: host root: %w", err)
		}
	}
	os.RemoveAll(b.hostroot)
	if err := os.Rename(tmp, b.hostroot); err != nil {
		return fmt.Errorf("sandbox: host root: %w", err)
	}
	return nil
}

// checkHostPath refuses host paths that would expose what a sandbox must
// never see.
func checkHostPath(p, dataDir string) error {
	if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
		return fmt.Errorf("sandbox: host path %q must be a clean absolute path other than /", p)
	}
	for _, bad := range []string{"/root", "/home", "/proc", "/sys", "/dev", "/run", "/tmp", "/var", dataDir} {
		if within(strings.TrimPrefix(p, "/"), strings.TrimPrefix(bad, "/")) || within(strings.TrimPrefix(bad, "/"), strings.TrimPrefix(p, "/")) {
			return fmt.Errorf("sandbox: host path %q would expose %s to sandboxes", p, bad)
		}
	}
	return nil
}

// The /etc files Nix's sandbox gives a builder.
const (
	NixPasswd = "root:x:0:0:Nix build user:/build:/noshell\nnixbld:x:1000:100:Nix build user:/build:/noshell\nnobody:x:65534:65534:Nobody:/:/noshell\n"
	NixGroup  = "root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n"
	NixHosts  = "127.0.0.1 localhost\n::1 localhost\n"
)
