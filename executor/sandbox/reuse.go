package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Reusable sandboxes (RuncOptions.Reuse). Creating a container costs
// ~25–45 ms of CPU here, most of it runc's init: libcontainer re-executes
// this 40 MB binary, whose Go start-up alone is ~8 ms. A reusable sandbox
// is created once and runs up to Reuse commands, one after another: its
// stub stays as a zygote and clones each command into new user, mount,
// pid, ipc, uts and network namespaces (tf_zygote in stubc.go), as Nix
// clones its builders. Between two commands the executor empties what a
// command could write (the writable directories, /tmp, the overlay's
// upper layer) and unmounts the overlay; what else a command could leave
// behind lives in its namespaces and dies with them.
//
// Sandboxes with the host's network (fixed-output derivations) are never
// reused: their /etc files are mountpoints in the input root. A reused sandbox
// of the HostRoot layout (plain REAPI actions) runs its commands in a user
// namespace too, which maps only uid 1000 and gid 100 to themselves: the
// host's files show as nobody's, the identity and privileges are those of
// a sandbox made for the command.

// reusable reports whether sandboxes of shape s can be reused.
func (b *Runc) reusable(s Shape) bool {
	return b.opts.Reuse > 1 && s.Network != NetworkHost
}

// tmpDir is the host directory of a reusable sandbox's /tmp: the root's
// own in the Chroot layout, else one beside the input root.
func (in *runcInstance) tmpDir() string {
	if in.shape.Layout == Chroot {
		return filepath.Join(in.root, "tmp")
	}
	return filepath.Join(in.dir, "tmp")
}

// stubConn reads the zygote's messages (see tf_zygote) from the control
// socket, with the descriptors that come with them.
type stubConn struct {
	in  *runcInstance
	buf []byte
	fds []int
}

// fill reads more from the socket.
func (c *stubConn) fill() error {
	var b [4096]byte
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := c.in.ctl.ReadMsgUnix(b[:], oob)
	n, oobn = max(n, 0), max(oobn, 0) // -1 with an error such as ECONNRESET
	if oobn > 0 {
		if msgs, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
			for i := range msgs {
				if fds, err := unix.ParseUnixRights(&msgs[i]); err == nil {
					c.fds = append(c.fds, fds...)
				}
			}
		}
	}
	c.buf = append(c.buf, b[:n]...)
	if n == 0 {
		if err == nil {
			err = io.EOF
		}
		return err
	}
	return nil
}

// need reads until n bytes are buffered.
func (c *stubConn) need(n int) error {
	for len(c.buf) < n {
		if err := c.fill(); err != nil {
			return fmt.Errorf("sandbox: zygote: %w", err)
		}
	}
	return nil
}

// next returns the next message: its tag and payload ('E' and 'F': the
// message; 'X': 28 bytes), and for 'P' the descriptor.
func (c *stubConn) next() (tag byte, payload []byte, fd int, err error) {
	if err := c.need(1); err != nil {
		return 0, nil, -1, err
	}
	tag, fd = c.buf[0], -1
	switch tag {
	case 'R', 'S':
		c.buf = c.buf[1:]
	case 'P':
		c.buf = c.buf[1:]
		if len(c.fds) == 0 {
			return 0, nil, -1, errors.New("sandbox: zygote: pty without its descriptor")
		}
		fd, c.fds = c.fds[0], c.fds[1:]
	case 'E', 'F':
		if err := c.need(5); err != nil {
			return 0, nil, -1, err
		}
		n := int(binary.LittleEndian.Uint32(c.buf[1:5]))
		if n > 1<<16 {
			return 0, nil, -1, fmt.Errorf("sandbox: zygote: message of %d bytes", n)
		}
		if err := c.need(5 + n); err != nil {
			return 0, nil, -1, err
		}
		payload = append([]byte(nil), c.buf[5:5+n]...)
		c.buf = c.buf[5+n:]
	case 'X':
		if err := c.need(29); err != nil {
			return 0, nil, -1, err
		}
		payload = append([]byte(nil), c.buf[1:29]...)
		c.buf = c.buf[29:]
	default:
		return 0, nil, -1, fmt.Errorf("sandbox: unexpected message %q from the zygote", c.buf)
	}
	return tag, payload, fd, nil
}

// runReused runs cmd in a reusable sandbox: the zygote clones a process
// into new namespaces for it. A sandbox whose run did not end with the
// command's exit status reported is destroyed on Release.
func (in *runcInstance) runReused(ctx context.Context, cmd *Command, msg []byte) (*Result, error) {
	in.broken = true // until the command's end is reported
	in.uses++
	res := &Result{Warm: in.warm}
	if !in.warm {
		res.Timings.Create = in.createTime
	}
	t0 := time.Now()
	if err := in.setLimits(); err != nil {
		return nil, err
	}
	in.oomBase = in.oomCount()
	tmp := in.tmpDir()
	if err := os.Chown(tmp, 0, 0); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	if err := os.Chmod(tmp, os.ModeSticky|0o777); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	// The command's own captured streams, which reset removes.
	open := func(name string) (*os.File, error) {
		f, err := os.OpenFile(filepath.Join(in.dir, fmt.Sprintf("%s.%d", name, in.uses)), os.O_CREATE|os.O_EXCL|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
		in.useFiles = append(in.useFiles, f.Name())
		return f, nil
	}
	out, err := open("stdout")
	if err != nil {
		return nil, err
	}
	defer out.Close()
	errf, err := open("stderr")
	if err != nil {
		return nil, err
	}
	defer errf.Close()
	res.Stdout, res.Stderr = out.Name(), errf.Name()

	c := in.conn // its 'R' was read by create, or by reset
	if _, _, err := in.ctl.WriteMsgUnix(msg, unix.UnixRights(int(out.Fd()), int(errf.Fd())), nil); err != nil {
		return nil, fmt.Errorf("sandbox: send command to the zygote: %w", err)
	}

	type event struct {
		tag     byte
		payload []byte
		fd      int
		err     error
	}
	events := make(chan event, 4)
	go func() {
		for {
			tag, p, fd, err := c.next()
			events <- event{tag, p, fd, err}
			if err != nil || tag == 'X' || tag == 'F' {
				return
			}
		}
	}()

	var ptyDone chan struct{}
	var userErr string
	timeout := cmd.Timeout
	var timer <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timer = t.C
	}
	kill := func() {
		in.c.Signal(unix.SIGKILL) // the zygote, and with its pid namespace everything in the sandbox
		for ev := range events {
			if ev.err != nil || ev.tag == 'X' || ev.tag == 'F' {
				break
			}
			if ev.fd >= 0 {
				unix.Close(ev.fd)
			}
		}
	}
	started := false
	for {
		var ev event
		select {
		case ev = <-events:
		case <-timer:
			kill()
			if !started {
				res.Started = time.Now()
			}
			res.Exited = time.Now()
			res.TimedOut = true
			res.Signal, res.ExitCode = int(unix.SIGKILL), 128+int(unix.SIGKILL)
			if ptyDone != nil {
				<-ptyDone
			}
			return res, nil
		case <-ctx.Done():
			kill()
			if ptyDone != nil {
				<-ptyDone
			}
			return nil, ctx.Err()
		}
		if ev.err != nil {
			in.c.Signal(unix.SIGKILL)
			return nil, fmt.Errorf("%w%s", ev.err, in.tail(in.stderr))
		}
		switch ev.tag {
		case 'P':
			if !cmd.PTY || ptyDone != nil {
				unix.Close(ev.fd)
				kill()
				return nil, errors.New("sandbox: zygote sent a pty that was not asked for")
			}
			master := os.NewFile(uintptr(ev.fd), "pty")
			ch := make(chan struct{})
			ptyDone = ch
			go func() {
				defer close(ch)
				defer master.Close()
				io.Copy(out, master) // ends with EIO when the last holder of the slave exits
			}()
		case 'S', 'E':
			if cmd.PTY && ptyDone == nil && ev.tag == 'S' {
				kill()
				return nil, errors.New("sandbox: command exec'ed without a pty")
			}
			started = true
			userErr = string(ev.payload)
			res.Started = time.Now()
			res.Timings.Start = res.Started.Sub(t0)
		case 'F':
			in.c.Signal(unix.SIGKILL)
			return nil, fmt.Errorf("sandbox: %s", ev.payload)
		case 'X':
			res.Exited = time.Now()
			if !started {
				kill()
				return nil, errors.New("sandbox: zygote reported an exit before the start")
			}
			if ptyDone != nil {
				<-ptyDone
			}
			res.setStatus(syscall.WaitStatus(binary.LittleEndian.Uint32(ev.payload[0:4])))
			res.UserTime = time.Duration(binary.LittleEndian.Uint64(ev.payload[4:12])) * time.Microsecond
			res.SystemTime = time.Duration(binary.LittleEndian.Uint64(ev.payload[12:20])) * time.Microsecond
			res.MaxRSS = int64(binary.LittleEndian.Uint64(ev.payload[20:28])) * 1024
			res.OOMKilled = in.oomCount() > in.oomBase
			if userErr != "" {
				fmt.Fprintf(errf, "tvixfarm sandbox: %s\n", userErr)
			}
			res.Timings.Wait = time.Since(res.Exited)
			in.broken = false
			return res, nil
		default:
			kill()
			return nil, fmt.Errorf("sandbox: unexpected message %q from the zygote", ev.tag)
		}
	}
}

// recycle makes a used reusable sandbox ready for another command and
// reports whether it could: the overlay is unmounted (its layers
// released), what the command could write is moved to the trash, and the
// zygote must have said it is ready.
func (in *runcInstance) recycle() bool {
	if !in.reuse || in.broken || in.c == nil || in.conn == nil || in.uses >= in.b.opts.Reuse {
		return false
	}
	if err := in.reset(); err != nil {
		in.b.log.Warn("sandbox: cannot reuse a sandbox; destroying it", "dir", in.dir, "err", err)
		return false
	}
	in.warm = true
	return true
}

func (in *runcInstance) reset() error {
	if in.overlayDone != nil {
		if err := in.unmountOverlay(); err != nil {
			return err
		}
		in.overlayDone()
		in.overlayDone, in.layers = nil, nil
	}
	for _, f := range in.useFiles {
		os.Remove(f)
	}
	in.useFiles = in.useFiles[:0]
	if err := in.resetDir(""); err != nil {
		return err
	}
	if in.shape.Layout != Chroot {
		if err := in.empty(in.tmpDir()); err != nil {
			return err
		}
	}
	// The container's /dev/shm is shared by its commands (a tmpfs that
	// runc mounted, as the host's root owns it under Nix).
	shm := fmt.Sprintf("/proc/%d/root/dev/shm", in.stubPid)
	sub, err := os.ReadDir(shm)
	if err != nil {
		return err
	}
	for _, e := range sub {
		if err := os.RemoveAll(filepath.Join(shm, e.Name())); err != nil {
			return err
		}
	}
	in.ctl.SetReadDeadline(time.Now().Add(5 * time.Second))
	defer in.ctl.SetReadDeadline(time.Time{})
	tag, _, _, err := in.conn.next()
	if err != nil || tag != 'R' {
		return fmt.Errorf("zygote not ready: %v", err)
	}
	return nil
}

// unmountOverlay unmounts the overlay of a reusable sandbox on the host
// (and so in the container, a slave of the host's shared mount) and moves
// its upper layer and work directory to the trash.
func (in *runcInstance) unmountOverlay() error {
	if err := unix.Unmount(filepath.Join(in.root, in.shape.Overlay), unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount the overlay: %w", err)
	}
	ents, err := os.ReadDir(in.dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		n := e.Name()
		if in.lowerMounts && strings.HasPrefix(n, "lower-") {
			// The overlays of more than maxLayers layers under the top one.
			if err := unix.Unmount(filepath.Join(in.dir, n), unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount the overlay's %s: %w", n, err)
			}
		}
		if n == "upper" || n == "work" || n == "empty" || strings.HasPrefix(n, "lower-") {
			if err := in.b.trash.move(filepath.Join(in.dir, n)); err != nil {
				return err
			}
		}
	}
	return nil
}

// keptDirs are the directories of a reusable sandbox's root that stay
// (emptied) between commands: the mountpoints of the container's mounts
// (the writable directories, the overlay's, /tmp, /dev and /proc). A
// mountpoint moved away on the host would take the container's mount
// with it.
func (in *runcInstance) keptDirs() []string {
	if in.shape.Layout != Chroot {
		return in.shape.Writable // the root is the input root's mountpoint only
	}
	return append(append([]string(nil), in.shape.Writable...), "tmp", "dev", "proc")
}

// empty moves everything in dir to the trash.
func (in *runcInstance) empty(dir string) error {
	sub, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, s := range sub {
		if err := in.b.trash.move(filepath.Join(dir, s.Name())); err != nil {
			return err
		}
	}
	return nil
}

// resetDir moves everything under the root's directory rel to the trash
// except the kept directories, which it empties, and their parents.
func (in *runcInstance) resetDir(rel string) error {
	dir := filepath.Join(in.root, rel)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	kept := in.keptDirs()
	for _, e := range ents {
		child := path.Join(rel, e.Name())
		keep, parent := false, false
		for _, k := range kept {
			if k == child {
				keep = true
			} else if strings.HasPrefix(k, child+"/") {
				parent = true
			}
		}
		p := filepath.Join(in.root, child)
		switch {
		case keep && e.IsDir():
			if err := in.empty(p); err != nil {
				return err
			}
		case parent && e.IsDir():
			if err := in.resetDir(child); err != nil {
				return err
			}
		case keep || parent:
			return fmt.Errorf("%s is no longer a directory", child)
		default:
			if err := in.b.trash.move(p); err != nil {
				return err
			}
		}
	}
	return nil
}
