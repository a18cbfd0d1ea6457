package nar

import (
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// hashLen is the length of the nix32 hash part of a store path name.
const hashLen = 32

// isNix32 and nix32Value classify bytes: whether they are nix32 digits,
// and their value if they are.
var isNix32, nix32Value = func() (is [256]bool, val [256]byte) {
	for i := 0; i < len(nixbase32.Alphabet); i++ {
		is[nixbase32.Alphabet[i]] = true
		val[nixbase32.Alphabet[i]] = byte(i)
	}
	return is, val
}()

// Scanner finds references to store paths in a stream, as Nix does
// (libstore/references.cc): a candidate is referred to if the 32-character
// nix32 hash part of its name occurs anywhere in the stream, at any
// offset, with or without the store directory before it, also when the
// occurrence is split across Write calls.
//
// It differs from go-nix's references.ReferenceScanner, which only finds
// hashes that start at a multiple of 32 characters into a run of nix32
// characters, and so misses "ab" followed by a hash, which Nix finds.
type Scanner struct {
	paths  []string       // the candidates, one per hash part
	index  map[string]int // hash part -> index in paths
	filter [1 << 15 / 64]uint64
	found  []bool
	left   int // candidates not found yet
	tail   [hashLen - 1]byte
	ntail  int // the last bytes written, if nix32 digits
}

// NewScanner returns a Scanner looking for the store paths candidates.
// Each must be a path whose last component is a store path name: 32 nix32
// characters, '-' and a name. Duplicates are ignored; of distinct paths
// with the same hash part, the first is reported.
func NewScanner(candidates []string) (*Scanner, error) {
	s := &Scanner{index: make(map[string]int, len(candidates))}
	for _, c := range candidates {
		base := path.Base(c)
		if len(base) < hashLen+2 || base[hashLen] != '-' || !strings.HasPrefix(c, "/") {
			return nil, fmt.Errorf("nar: reference candidate %q is not a store path", c)
		}
		h := base[:hashLen]
		for i := 0; i < hashLen; i++ {
			if !isNix32[h[i]] {
				return nil, fmt.Errorf("nar: reference candidate %q is not a store path: invalid hash part", c)
			}
		}
		if _, ok := s.index[h]; ok {
			continue
		}
		s.index[h] = len(s.paths)
		s.paths = append(s.paths, c)
		x := filterKey(h)
		s.filter[x/64] |= 1 << (x % 64)
	}
	s.found = make([]bool, len(s.paths))
	s.left = len(s.paths)
	return s, nil
}

// filterKey maps the first three characters of a hash part to 15 bits.
func filterKey(h string) uint32 {
	return uint32(nix32Value[h[0]])<<10 | uint32(nix32Value[h[1]])<<5 | uint32(nix32Value[h[2]])
}

// Write scans p. It never fails.
func (s *Scanner) Write(p []byte) (int, error) {
	if s.left == 0 || len(p) == 0 {
		return len(p), nil
	}
	if s.ntail > 0 {
		// Hashes that start in the tail and end in p.
		var buf [2*hashLen - 2]byte
		n := copy(buf[:], s.tail[:s.ntail])
		n += copy(buf[n:], p[:min(len(p), hashLen-1)])
		s.search(buf[:n])
	}
	s.search(p)
	// Keep the trailing run of nix32 digits, up to hashLen-1 of them.
	run := 0
	for run < len(p) && run < hashLen-1 && isNix32[p[len(p)-1-run]] {
		run++
	}
	if run == len(p) {
		// All of p is nix32, and so is the old tail: append.
		keep := min(s.ntail, hashLen-1-run)
		copy(s.tail[:], s.tail[s.ntail-keep:s.ntail])
		copy(s.tail[keep:], p)
		s.ntail = keep + run
	} else {
		s.ntail = copy(s.tail[:], p[len(p)-run:])
	}
	return len(p), nil
}

// search looks for the hash parts in b. For each window of hashLen bytes
// it looks at the last byte first, as Nix does, so that data with few
// nix32 digits is skipped hashLen bytes at a time; in a run of nix32
// digits it slides one byte at a time, looking at each new byte once.
func (s *Scanner) search(b []byte) {
	n := len(b)
	for i := 0; i+hashLen <= n; {
		w := (*[hashLen]byte)(b[i:])
		j := hashLen - 1
		for j >= 0 && isNix32[w[j]] {
			j--
		}
		if j >= 0 {
			i += j + 1
			continue
		}
		// b[i:i+hashLen] is all nix32.
		x := uint32(nix32Value[w[0]])<<5 | uint32(nix32Value[w[1]])
		for {
			x = (x<<5 | uint32(nix32Value[b[i+2]])) & (1<<15 - 1)
			if s.filter[x/64]&(1<<(x%64)) != 0 {
				if k, ok := s.index[string(b[i:i+hashLen])]; ok && !s.found[k] {
					s.found[k] = true
					if s.left--; s.left == 0 {
						return
					}
				}
			}
			if i+hashLen >= n || !isNix32[b[i+hashLen]] {
				i += hashLen + 1
				break
			}
			i++
		}
	}
}

// References returns the candidates found so far, sorted.
func (s *Scanner) References() []string {
	var refs []string
	for i, ok := range s.found {
		if ok {
			refs = append(refs, s.paths[i])
		}
	}
	slices.Sort(refs)
	return refs
}
