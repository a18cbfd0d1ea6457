// Package rpc holds gRPC plumbing shared by tvixfarm's servers and clients.
package rpc

import (
	"sync"

	"google.golang.org/grpc/mem"
)

// BufferPool returns the buffer pool tvixfarm's gRPC servers and clients
// use for received messages. grpc-go's default pool has a tier at 32 KiB
// and the next at 1 MiB, and zeroes the whole buffer on every Get: a
// client that streams 64 KiB ByteStream chunks made the server clear 1 MiB
// per message, more work than storing the data. This pool has a tier for
// every power of two (and a page above it, for message framing) and does
// not zero: every buffer handed out is overwritten by the message that is
// read into it.
func BufferPool() mem.BufferPool { return pool }

var pool = newTieredPool()

type tieredPool struct {
	sizes []int
	pools []sync.Pool
}

func newTieredPool() *tieredPool {
	p := &tieredPool{}
	for shift := 8; shift <= 24; shift++ {
		p.sizes = append(p.sizes, 1<<shift)
		if shift >= 12 {
			p.sizes = append(p.sizes, 1<<shift+4096)
		}
	}
	p.pools = make([]sync.Pool, len(p.sizes))
	return p
}

// tier returns the index of the smallest tier that holds size, or -1.
func (p *tieredPool) tier(size int) int {
	lo, hi := 0, len(p.sizes)
	for lo < hi {
		m := (lo + hi) / 2
		if p.sizes[m] >= size {
			hi = m
		} else {
			lo = m + 1
		}
	}
	if lo == len(p.sizes) {
		return -1
	}
	return lo
}

// Get returns a buffer of length size.
func (p *tieredPool) Get(size int) *[]byte {
	t := p.tier(size)
	if t < 0 {
		b := make([]byte, size)
		return &b
	}
	if bp, ok := p.pools[t].Get().(*[]byte); ok {
		*bp = (*bp)[:size]
		return bp
	}
	b := make([]byte, size, p.sizes[t])
	return &b
}

// Put returns a buffer to its tier.
func (p *tieredPool) Put(bp *[]byte) {
	c := cap(*bp)
	t := p.tier(c)
	if t < 0 || p.sizes[t] != c {
		return // not one of ours
	}
	p.pools[t].Put(bp)
}
