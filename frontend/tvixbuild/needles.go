package tvixbuild

import (
	"bytes"
	"context"
	"io"

	"tvixfarm/cas/blobstore"
	"tvixfarm/frontend/nar"
)

// scanNeedles returns the indexes of the needles that occur in n's NAR
// serialisation (file contents, symlink targets and, as Nix scans, names:
// a superset of what Tvix's own scanner reports). Needles that are store
// path hash parts (32 nixbase32 characters, all Tvix and Snix send) use
// the NAR package's reference scanner; any others a plain search.
func scanNeedles(ctx context.Context, cas blobstore.BlobAccess, n nar.Node, needles []string) ([]uint64, error) {
	if len(needles) == 0 {
		return nil, nil
	}
	var hashes []string
	byPath := map[string][]uint64{}
	var other []int
	for i, s := range needles {
		if isHashPart(s) {
			p := "/needle/" + s + "-n"
			if _, ok := byPath[p]; !ok {
				hashes = append(hashes, p)
			}
			byPath[p] = append(byPath[p], uint64(i))
		} else {
			other = append(other, i)
		}
	}
	h, err := nar.NewHasher(hashes)
	if err != nil {
		return nil, err
	}
	plain := &plainScanner{needles: needles, which: other, found: make([]bool, len(needles))}
	if err := nar.Write(ctx, cas, fn, n, io.MultiWriter(h, plain)); err != nil {
		return nil, err
	}
	_, _, refs := h.Sum()
	found := make([]bool, len(needles))
	for _, r := range refs {
		for _, i := range byPath[r] {
			found[i] = true
		}
	}
	var out []uint64
	for i := range needles {
		if found[i] || plain.found[i] {
			out = append(out, uint64(i))
		}
	}
	return out, nil
}

// isHashPart reports whether s is 32 nixbase32 characters.
func isHashPart(s string) bool {
	if len(s) != 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z') || c == 'e' || c == 'o' || c == 'u' || c == 't' {
			return false
		}
	}
	return true
}

// plainScanner finds arbitrary needles in a stream, across writes.
type plainScanner struct {
	needles []string
	which   []int
	found   []bool
	tail    []byte
}

func (p *plainScanner) Write(b []byte) (int, error) {
	if len(p.which) == 0 {
		return len(b), nil
	}
	buf := append(p.tail, b...)
	longest := 0
	for _, i := range p.which {
		if !p.found[i] && bytes.Contains(buf, []byte(p.needles[i])) {
			p.found[i] = true
		}
		longest = max(longest, len(p.needles[i]))
	}
	keep := min(len(buf), longest-1)
	p.tail = append(p.tail[:0], buf[len(buf)-keep:]...)
	return len(b), nil
}
