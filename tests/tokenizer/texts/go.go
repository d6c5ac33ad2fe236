package main

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"
)

// Limiter is a token bucket shared by all handlers.
type Limiter struct {
	mu       sync.Mutex
	tokens   float64
	rate     float64
	capacity float64
	last     time.Time
}

var ErrLimited = errors.New("rate limited")

func (l *Limiter) Take(now time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.tokens += now.Sub(l.last).Seconds() * l.rate
	if l.tokens > l.capacity {
		l.tokens = l.capacity
	}
	l.last = now
	if l.tokens < 1 {
		return ErrLimited
	}
	l.tokens--
	return nil
}

func main() {
	lim := &Limiter{rate: 5, capacity: 10, last: time.Now()}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if err := lim.Take(time.Now()); err != nil {
			http.Error(w, err.Error(), http.StatusTooManyRequests)
			return
		}
		fmt.Fprintf(w, "hello, %s\n", r.URL.Path[1:])
	})
	_ = http.ListenAndServe(":8080", nil)
}
