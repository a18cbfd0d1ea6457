package blobstore

import "fmt"

// Stats describes what a store holds. Counts a backend cannot tell are -1.
type Stats struct {
	Backend  string
	Blobs    int64
	Bytes    int64
	MaxBytes int64
}

// StatsReporter is implemented by stores that can describe their contents.
type StatsReporter interface {
	Stats() Stats
}

// StatsOf returns the Stats of ba, or unknown counts if it cannot tell.
func StatsOf(ba BlobAccess) Stats {
	if r, ok := ba.(StatsReporter); ok {
		return r.Stats()
	}
	return Stats{Backend: fmt.Sprintf("%T", ba), Blobs: -1, Bytes: -1, MaxBytes: -1}
}

// Stats implements StatsReporter.
func (m *memory) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return Stats{Backend: "memory", Blobs: int64(len(m.items)), Bytes: m.size, MaxBytes: m.max}
}

// Stats implements StatsReporter. Bytes counts blob files and pack files.
func (s *disk) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Backend: "disk", Blobs: int64(len(s.index)), Bytes: s.size, MaxBytes: s.opts.MaxSize}
}

// Stats implements StatsReporter; Redis's own counts are not queried.
func (s *redisStore) Stats() Stats {
	return Stats{Backend: "redis", Blobs: -1, Bytes: -1, MaxBytes: -1}
}

// Stats implements StatsReporter with the counts of the local tier.
func (t *tiered) Stats() Stats {
	l, r := StatsOf(t.local), StatsOf(t.remote)
	l.Backend = fmt.Sprintf("tiered(%s, %s)", l.Backend, r.Backend)
	return l
}
