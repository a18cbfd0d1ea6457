package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// maxLayers is the most lower layers one overlayfs accepts; the 501st
// lowerdir+ fails with EINVAL. More layers are grouped into overlays of
// maxLayers each, stacked below the top one (overlayfs allows a stacking
// depth of 2).
const maxLayers = 500

// How an overlay is mounted: with the new mount API, one fsconfig call per
// layer, because mount(2)'s option string holds one page (~60 store paths).
// A sandbox whose Shape has an Overlay gets, at creation, its overlay
// directory bind-mounted onto itself and made shared, so that the overlay
// mounted there later, when the action's layers are known, propagates into
// a container that was prepared before: the container's copy of that mount
// is a slave of it.

// makeShared bind-mounts dir onto itself and makes it a shared mount.
func makeShared(dir string) error {
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("sandbox: bind %s: %w", dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		return fmt.Errorf("sandbox: make %s shared: %w", dir, err)
	}
	return nil
}

// mountOverlay mounts an overlay of layers at target, with upper and work
// (empty directories on the same file system) as its writable layer, or
// read-only if upper is "". It is nosuid and nodev.
func mountOverlay(target string, layers []string, upper, work string) error {
	fd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("sandbox: overlay: fsopen: %w", err)
	}
	defer unix.Close(fd)
	set := func(k, v string) error {
		if err := unix.FsconfigSetString(fd, k, v); err != nil {
			return fmt.Errorf("sandbox: overlay: %s=%s: %w", k, v, err)
		}
		return nil
	}
	for _, l := range layers {
		if err := set("lowerdir+", l); err != nil {
			return err
		}
	}
	attrs := unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV
	if upper != "" {
		if err := set("upperdir", upper); err != nil {
			return err
		}
		if err := set("workdir", work); err != nil {
			return err
		}
	} else {
		attrs |= unix.MOUNT_ATTR_RDONLY
	}
	// No inode index or redirects: layers are plain, shared directories.
	for _, kv := range [][2]string{{"index", "off"}, {"redirect_dir", "off"}, {"metacopy", "off"}} {
		if err := set(kv[0], kv[1]); err != nil {
			return err
		}
	}
	if err := unix.FsconfigCreate(fd); err != nil {
		return fmt.Errorf("sandbox: overlay of %d layers: %w", len(layers), err)
	}
	mfd, err := unix.Fsmount(fd, unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return fmt.Errorf("sandbox: overlay: fsmount: %w", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("sandbox: overlay: move_mount to %s: %w", target, err)
	}
	return nil
}

// overlay mounts the layers at target with a writable upper layer, using
// scratch (a directory on the same file system, owned by the sandbox) for
// the upper and work directories and for the mountpoints of intermediate
// overlays.
func overlay(target, scratch string, layers []string) error {
	upper, work := filepath.Join(scratch, "upper"), filepath.Join(scratch, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("sandbox: %w", err)
		}
	}
	if len(layers) == 0 {
		empty := filepath.Join(scratch, "empty")
		if err := os.Mkdir(empty, 0o755); err != nil {
			return fmt.Errorf("sandbox: %w", err)
		}
		layers = []string{empty}
	}
	if len(layers) > maxLayers*maxLayers {
		return fmt.Errorf("sandbox: %d layers are more than %d: %w", len(layers), maxLayers*maxLayers, ErrUnsupported)
	}
	if len(layers) > maxLayers {
		var lowers []string
		for i, chunk := range slices.Collect(slices.Chunk(layers, maxLayers)) {
			if len(chunk) == 1 {
				// A read-only overlay needs two layers; one is itself.
				lowers = append(lowers, chunk[0])
				continue
			}
			mp := filepath.Join(scratch, fmt.Sprintf("lower-%d", i))
			if err := os.Mkdir(mp, 0o755); err != nil {
				return fmt.Errorf("sandbox: %w", err)
			}
			if err := mountOverlay(mp, chunk, "", ""); err != nil {
				return err
			}
			lowers = append(lowers, mp)
		}
		layers = lowers
	}
	return mountOverlay(target, layers, upper, work)
}

// unmountUnder detaches every mount at dir or below it, deepest first. It
// is how sandboxes and recovery get rid of overlays and shared binds.
func unmountUnder(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("sandbox: mountinfo: %w", err)
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int {
		if c := strings.Count(b.Mountpoint, "/") - strings.Count(a.Mountpoint, "/"); c != 0 {
			return c
		}
		return b.ID - a.ID // stacked mounts: the newest first
	})
	var errs []error
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m.Mountpoint, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("sandbox: %w", errors.Join(errs...))
	}
	return nil
}
