package coordinator

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
	"tvixfarm/frontend/translate"
)

// SandboxFiles reads the files that Nix's sandbox-paths entries
// ("target=source" or "path", "?" suffix: optional) bind-mount into every
// sandbox, stores them in cas and returns them for translate.Config.
// Only regular files are supported (a /bin/sh, typically); directories are
// an error.
func SandboxFiles(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, entries []string) (map[string]translate.File, error) {
	files := map[string]translate.File{}
	for _, e := range entries {
		target, source, ok := strings.Cut(e, "=")
		if !ok {
			source = target
		}
		optional := strings.HasSuffix(source, "?")
		source = strings.TrimSuffix(source, "?")
		if !filepath.IsAbs(target) || !filepath.IsAbs(source) {
			return nil, fmt.Errorf("sandbox path %q: paths must be absolute", e)
		}
		st, err := os.Stat(source)
		if os.IsNotExist(err) && optional {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("sandbox path %q: %w", e, err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("sandbox path %q: only regular files are supported", e)
		}
		data, err := os.ReadFile(source)
		if err != nil {
			return nil, fmt.Errorf("sandbox path %q: %w", e, err)
		}
		d := digest.Compute(fn, data)
		missing, err := cas.FindMissing(ctx, []digest.Digest{d})
		if err != nil {
			return nil, fmt.Errorf("sandbox path %q: %w", e, err)
		}
		if len(missing) > 0 {
			if err := cas.Put(ctx, d, strings.NewReader(string(data))); err != nil {
				return nil, fmt.Errorf("sandbox path %q: uploading: %w", e, err)
			}
		}
		files[filepath.Clean(target)] = translate.File{Digest: d, Executable: st.Mode()&0o100 != 0}
	}
	return files, nil
}
