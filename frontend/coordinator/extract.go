package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	gonar "github.com/nix-community/go-nix/pkg/nar"

	"tvixfarm/cas/digest"
	"tvixfarm/frontend/nar"
)

// Extract writes the store path p from the farm to dst as plain files
// (no local Nix store needed): directories 0755, files 0644 or 0755,
// symlinks as they are. dst must not exist.
func Extract(ctx context.Context, farm Farm, p, dst string) error {
	infos, err := farm.Store.Get(ctx, []string{p})
	if err != nil {
		return err
	}
	info := infos[p]
	if info == nil {
		return fmt.Errorf("%s is not on the farm", p)
	}
	n, err := NarNode(info.Node)
	if err != nil {
		return err
	}
	fn, ok := digest.FunctionFromName(info.Node.GetDigestFunction())
	if !ok {
		fn = digest.BLAKE3
	}
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("%s exists", dst)
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(nar.Write(ctx, farm.CAS, fn, n, pw)) }()
	defer pr.Close()
	nr, err := gonar.NewReader(pr)
	if err != nil {
		return err
	}
	for {
		h, err := nr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		rel := strings.TrimPrefix(h.Path, "/")
		if rel != filepath.Clean(rel) && rel != "" || strings.HasPrefix(rel, "..") {
			return fmt.Errorf("%s: bad NAR entry %q", p, h.Path)
		}
		target := filepath.Join(dst, rel)
		switch h.Type {
		case gonar.TypeDirectory:
			err = os.Mkdir(target, 0o755)
		case gonar.TypeSymlink:
			err = os.Symlink(h.LinkTarget, target)
		case gonar.TypeRegular:
			mode := os.FileMode(0o644)
			if h.Executable {
				mode = 0o755
			}
			var f *os.File
			if f, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode); err == nil {
				_, err = io.Copy(f, nr)
				if cerr := f.Close(); err == nil {
					err = cerr
				}
			}
		}
		if err != nil {
			return fmt.Errorf("extracting %s: %w", p, err)
		}
	}
}
