package org.example.cache;

import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Objects;

/**
 * A least-recently-used cache with a fixed capacity.
 * @param <K> key type
 * @param <V> value type
 */
public final class LruCache<K, V> extends LinkedHashMap<K, V> {
    private static final long serialVersionUID = 42L;
    private final int capacity;

    public LruCache(int capacity) {
        super(16, 0.75f, true);
        if (capacity <= 0) {
            throw new IllegalArgumentException("capacity must be > 0, got " + capacity);
        }
        this.capacity = capacity;
    }

    @Override
    protected boolean removeEldestEntry(Map.Entry<K, V> eldest) {
        return size() > capacity;
    }

    public V getOrCompute(K key, java.util.function.Function<? super K, ? extends V> fn) {
        Objects.requireNonNull(fn);
        V v = get(key);
        if (v == null) {
            v = fn.apply(key);
            put(key, v);
        }
        return v;
    }
}
